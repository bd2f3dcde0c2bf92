"""Typed errors. Every error the core raises on purpose is a `ParrotError`.

Errors caused by what a caller sent (a malformed template, a bad sampling value, an unknown
id) derive from `InvalidRequestError` as well, so a server can answer them with a 4xx and the
caller can tell them apart from failures inside the system.
"""

from __future__ import annotations


class ParrotError(Exception):
    """Base class of every error raised on purpose by parrot-core."""


class InvalidRequestError(ParrotError, ValueError):
    """The caller asked for something that can never run as sent."""


class TemplateError(InvalidRequestError):
    """A semantic-function template is malformed."""


class GraphCycleError(InvalidRequestError):
    """Adding a request would make the semantic-variable graph cyclic."""


class NotFoundError(ParrotError, KeyError):
    """An id names nothing that is alive (a context, variable, session or engine)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class UnknownContextError(NotFoundError):
    """A context id is unknown or was already freed."""


class UnknownVariableError(NotFoundError):
    """A semantic-variable id is unknown (or belongs to another session)."""


class UnknownSessionError(NotFoundError):
    """A session id is unknown or the session was removed."""


class UnknownGenerationError(NotFoundError):
    """A suspended generation's id (pid) is unknown to its caller: never created by it,
    finished, discarded or expired."""


class EngineNotFoundError(NotFoundError):
    """An engine id is unknown or the engine was removed."""


class VariableAlreadySetError(ParrotError):
    """A semantic variable is write-once and already holds a value or an error."""


class ContextFailedError(ParrotError):
    """A context's Fill failed; every task waiting on that context gets this error."""


class EngineError(ParrotError):
    """An engine call failed."""


class EngineUnavailableError(EngineError):
    """An engine is down or gone (closed, unreachable, dead, or failing every call): the work
    placed on it fails with this, and new work goes to the other engines."""


class UnsupportedByEngineError(InvalidRequestError):
    """The engine cannot do what was asked (an optional engine capability it lacks, such as
    carving contexts for chat sessions or saving KV); the message names both."""


class OutOfBlocksError(EngineError):
    """The KV block pool cannot hold what was asked for right now."""


class RequestTooLargeError(InvalidRequestError):
    """A request can never fit (longer than the model or than the whole KV pool)."""


class RuntimeClosedError(ParrotError):
    """The runtime was closed and refuses new work."""


class InvariantError(ParrotError):
    """Internal bookkeeping is inconsistent (a bug, never the caller's fault)."""


class ModelLoadError(ParrotError):
    """A model file is missing, unreadable, or of an architecture or format the engine cannot run."""
