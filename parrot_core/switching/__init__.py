"""Suspend and resume generations with their KV kept, and round-robin fair sharing among
agents (seeds 000 and 001): `rt.generate(..., time_limit=, token_quantum=, pid=)`,
`rt.resume(pid)`, `rt.suspended()`, `rt.discard(pid)`, `rt.round_robin(prompts, ...)`.

Importing this package (as `import parrot_core` does) gives every `Runtime` its
`SwitchingManager` (`rt.switching`), as `parrot_core.chat` does for chat sessions.
"""

from parrot_core.frontend.runtime import Runtime
from parrot_core.switching.manager import (
    FINISH_SUSPENDED,
    SlicedOutput,
    SliceDelta,
    SuspendedInfo,
    SwitchingManager,
    collect_slice,
)
from parrot_core.switching.round_robin import RoundRobinResult, SliceRecord, run_round_robin

Runtime._switching_factory = SwitchingManager

__all__ = [
    "FINISH_SUSPENDED",
    "RoundRobinResult",
    "SliceDelta",
    "SliceRecord",
    "SlicedOutput",
    "SuspendedInfo",
    "SwitchingManager",
    "collect_slice",
    "run_round_robin",
]
