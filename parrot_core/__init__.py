"""parrot-core: a prefix-sharing LLM serving core with a forkable context tree.

    import parrot_core as P
    with P.Runtime() as rt:                      # the embedded default model, in-process
        out = rt.generate("The capital of France is", max_tokens=8, temperature=0.0)
        root = rt.new_context(); root.fill("shared prompt")
        a = root.fork(); a.fill(" question"); a.generate(max_tokens=16)
"""

from parrot_core import errors
from parrot_core.engines.base import SamplingParams
from parrot_core.frontend.runtime import ContextHandle, GenerateOutput, Runtime
from parrot_core.graph import PerfCriteria, SemanticVariable

LATENCY = PerfCriteria.LATENCY
THROUGHPUT = PerfCriteria.THROUGHPUT

__version__ = "0.1.0"

__all__ = [
    "LATENCY",
    "THROUGHPUT",
    "ContextHandle",
    "GenerateOutput",
    "PerfCriteria",
    "Runtime",
    "SamplingParams",
    "SemanticVariable",
    "errors",
]
