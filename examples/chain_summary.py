"""Chain summarization: summarize the first chunk, then refine the summary chunk by chunk.

Each call's output flows into the next call on the server side; only the final summary is
fetched. The instructions (the constant prefix of `refine`) are computed once.
"""

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import parrot_core as P
from _texts import chunks

SUMMARY = P.Output(max_tokens=48, temperature=0.0)


@P.semantic_function()
def first_summary(text: P.Input, summary: SUMMARY):
    """<|im_start|>system
    You summarize technical documentation in two sentences.<|im_end|>
    <|im_start|>user
    Summarize this text:
    {{text}}<|im_end|>
    <|im_start|>assistant
    {{summary}}"""


@P.semantic_function()
def refine(previous: P.Input, text: P.Input, summary: SUMMARY):
    """<|im_start|>system
    You refine a running summary of technical documentation. Keep it to two sentences.<|im_end|>
    <|im_start|>user
    Current summary: {{previous}}
    New text: {{text}}
    Write the refined summary.<|im_end|>
    <|im_start|>assistant
    {{summary}}"""


def main() -> None:
    parts = chunks(words_per_chunk=100, limit=4)
    with P.Runtime() as rt:
        summary = first_summary(parts[0])
        for part in parts[1:]:
            summary = refine(summary, part)
        print(f"Summary of {len(parts)} chunks:\n{summary.get(P.LATENCY).strip()}")
        print(f"prompt tokens computed: {rt.stats()['prompt_tokens_computed']}")


if __name__ == "__main__":
    main()
