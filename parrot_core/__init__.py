"""parrot-core: a prefix-sharing LLM serving core with a forkable context tree.

    import parrot_core as P

    @P.semantic_function()
    def answer(question: P.Input, reply: P.Output(max_tokens=32, temperature=0.0)):
        \"\"\"You are a helpful assistant. Question: {{question}} Answer: {{reply}}\"\"\"

    with P.Runtime() as rt:                      # the embedded default model, in-process
        print(answer("What is the capital of France?").get())
        out = rt.generate("The capital of France is", max_tokens=8, temperature=0.0)
        root = rt.new_context(); root.fill("shared prompt")
        a = root.fork(); a.fill(" question"); a.generate(max_tokens=16)
        with rt.chat(system="You are terse.") as chat:   # keeps its KV across turns
            chat.send("Hi!", max_tokens=32); chat.send("Again?", max_tokens=32)
        part = rt.generate("Once upon", max_tokens=64, token_quantum=8, pid="a")   # "suspended"
        rest = rt.resume("a")                    # continues with its KV: part + rest == one run
"""

from parrot_core import errors, graph
from parrot_core.chat import ChatSession, ChatSessionConfig, ChatSessionManager
from parrot_core.engines.base import SamplingParams
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.engines.openai import OpenAIEngine
from parrot_core.engines.vllm import VLLMEngine
from parrot_core.engines.builtin.kv_io import ContextFileError
from parrot_core.frontend.function import Input, Output, native_function, semantic_function, variable
from parrot_core.frontend.remote import connect
from parrot_core.frontend.runtime import ContextHandle, GenerateOutput, Runtime, StreamDelta, current_runtime
from parrot_core.graph import PerfCriteria, SemanticVariable
from parrot_core.switching import RoundRobinResult, SlicedOutput, SliceDelta, SuspendedInfo, SwitchingManager

LATENCY = PerfCriteria.LATENCY
THROUGHPUT = PerfCriteria.THROUGHPUT

__version__ = "0.1.0"

__all__ = [
    "LATENCY",
    "OpenAIEngine",
    "THROUGHPUT",
    "VLLMEngine",
    "BuiltinEngine",
    "ChatSession",
    "ChatSessionConfig",
    "ChatSessionManager",
    "ContextFileError",
    "ContextHandle",
    "GenerateOutput",
    "Input",
    "Output",
    "PerfCriteria",
    "RoundRobinResult",
    "Runtime",
    "SamplingParams",
    "SemanticVariable",
    "SliceDelta",
    "SlicedOutput",
    "StreamDelta",
    "SuspendedInfo",
    "SwitchingManager",
    "connect",
    "current_runtime",
    "errors",
    "graph",
    "native_function",
    "semantic_function",
    "variable",
]
