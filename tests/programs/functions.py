"""Semantic functions shared by the program tests (in-process and over HTTP)."""

import parrot_core as P

OUT = P.Output(max_tokens=6, temperature=0.0, ignore_eos=True)


@P.semantic_function()
def write_code(task: P.Input, code: OUT):
    """You are an expert engineer. Write Python code for {{task}}. Code: {{code}}"""


@P.semantic_function()
def write_tests(task: P.Input, code: P.Input, tests: OUT):
    """You are a QA engineer. Task: {{task}}. Code: {{code}}. Tests: {{tests}}"""


@P.semantic_function()
def review(tests: P.Input, verdict: OUT):
    """Review these tests: {{tests}}. Verdict: {{verdict}}"""
