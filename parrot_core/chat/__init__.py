"""Chat sessions that keep their KV across turns (design.md section 1: `chat/`).

    with P.Runtime() as rt:
        with rt.chat(system="You are terse.") as chat:
            print(chat.send("Hi!", max_tokens=32).text)
            print(chat.send("And again?", max_tokens=32).cached_tokens)   # the whole first turn
            chat.save("chat.safetensors")       # with its KV; back with rt.chat(restore=...)

This package sits above `frontend`: it plugs its manager into `Runtime` (`rt.chat_sessions`,
`rt.chat(...)`) when imported, so the runtime never imports it.
"""

from parrot_core.chat.manager import ChatSessionManager
from parrot_core.chat.session import ChatSession, ChatSessionConfig
from parrot_core.frontend.runtime import Runtime

Runtime._chat_manager_factory = ChatSessionManager

__all__ = ["ChatSession", "ChatSessionConfig", "ChatSessionManager"]
