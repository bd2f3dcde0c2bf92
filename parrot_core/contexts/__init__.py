"""Serve-layer contexts: metadata about KV cache in engines, and who keeps it alive."""

from parrot_core.contexts.context import Context, ContextScope
from parrot_core.contexts.manager import PrefixMatch, ServeCoreContextManager
from parrot_core.contexts.prefix_cache import PrefixCache
from parrot_core.contexts.task import ContextTask, NodeSpec

__all__ = ["Context", "ContextScope", "ContextTask", "NodeSpec", "PrefixCache", "PrefixMatch", "ServeCoreContextManager"]
