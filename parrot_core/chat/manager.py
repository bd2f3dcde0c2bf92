"""`ChatSessionManager`: the chat sessions of one runtime (`rt.chat_sessions`), by id."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from parrot_core.chat.saved import parse_saved_chat
from parrot_core.chat.session import ChatSession, ChatSessionConfig, _checked_messages
from parrot_core.chat.shared import SharedPrefixes
from parrot_core.errors import InvalidRequestError, UnknownSessionError
from parrot_core.frontend import saved_contexts
from parrot_core.frontend.runtime import Runtime
from parrot_core.frontend.saved_contexts import ContextFileError, PathLike

CLOSE_TIMEOUT_S = 30.0


class ChatSessionManager:
    """Creates, finds and removes a runtime's chat sessions. Sessions with the same system
    prompt share its KV (`prefixes`). Thread-safe; every session has its own lock, so turns
    of different sessions run concurrently."""

    DEFAULT_SESSION_ID = "default"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.prefixes = SharedPrefixes(runtime)
        self._sessions: dict[str, ChatSession] = {}
        self._lock = threading.Lock()  # guards `_sessions` (read from any thread)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            return session_id in self._sessions

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def create_session(
        self,
        system: str | None = None,
        session_id: str | None = None,
        config: ChatSessionConfig | None = None,
        restore: PathLike | None = None,
    ) -> ChatSession:
        """A new session (`rt.chat(...)`): an id is made up if none is given; an id in use is
        an `InvalidRequestError`. With `config.cache_warmup`, the system prompt is filled now.
        With `restore`, the session saved there (`restore_session`; `system` must be None)."""
        if restore is not None:
            if system is not None:
                raise InvalidRequestError("a restored chat session takes its system prompt from its file: pass system=None")
            return self.restore_session(restore, session_id=session_id, config=config)
        if system is not None and not isinstance(system, str):
            raise InvalidRequestError(f"the system prompt is a string, got {type(system).__name__}")
        messages = [{"role": "system", "content": system}] if system is not None else []
        sid = _checked_id(session_id) if session_id is not None else f"chat-{uuid.uuid4().hex[:12]}"
        return self.runtime._run(self._create(sid, _checked_config(config), messages, exists_ok=False))

    def get_session(self, session_id: str | None = None, config: ChatSessionConfig | None = None) -> ChatSession:
        """The session named `session_id` (None: the default session), created (empty, with
        `config`) on first use. A `config` different from an existing session's is an error."""
        sid = self.DEFAULT_SESSION_ID if session_id is None else _checked_id(session_id)
        config = _checked_config(config) if config is not None else None
        with self._lock:
            session = self._sessions.get(sid)
        if session is not None:
            _check_same_config(session, config)
            return session
        return self.runtime._run(self._create(sid, config or ChatSessionConfig(), [], exists_ok=True))

    def restore_session(
        self, path: PathLike, session_id: str | None = None, config: ChatSessionConfig | None = None
    ) -> ChatSession:
        """A new session holding the conversation `ChatSession.save` wrote to `path` (in this or
        any runtime on the same model, any block size): its messages, transcript (token ids
        included), system prompt, dropped-turn count and config (unless `config` is given),
        its KV written without computing anything, so the next turn computes only its new
        tokens. Its id is `session_id`, or the saved session's (an id in use is an
        `InvalidRequestError`). A file from another model, damaged or truncated, or holding a
        plain saved context rather than a chat session is a `P.ContextFileError`; every error
        leaves the runtime as it was. The system prompt is shared with this runtime's sessions
        that have the same one (its KV taken from the file if none has)."""
        return self.runtime._run(self._restore(path, session_id, config))

    async def arestore_session(
        self, path: PathLike, session_id: str | None = None, config: ChatSessionConfig | None = None
    ) -> ChatSession:
        return await self.runtime._on_loop(self._restore(path, session_id, config))

    def clear_session(self, session_id: str | None = None) -> None:
        """Clear a session's conversation (its system prompt stays)."""
        self._get(session_id).clear_messages()

    def remove_session(self, session_id: str | None = None) -> None:
        """Close a session: its KV is freed and its id forgotten."""
        self._get(session_id).close()

    def all_sessions(self) -> list[str]:
        """The ids of the open sessions."""
        with self._lock:
            return list(self._sessions)

    def close(self) -> None:
        """Close every session at once, without waiting for turns in progress (they fail and
        free their own contexts). `Runtime.close()` does this first. Touches nothing when no
        session is open, and never waits on a runtime loop that is gone."""
        with self._lock:
            if not self._sessions:
                return

        async def close_all() -> None:
            for session in self.all_sessions():
                with contextlib.suppress(UnknownSessionError):
                    self._get(session)._close_now()

        rt = self.runtime
        if rt._thread.is_alive() and not rt.closed:
            asyncio.run_coroutine_threadsafe(close_all(), rt._loop).result(timeout=CLOSE_TIMEOUT_S)

    # -- internals (on the runtime's loop) ---------------------------------------------------
    async def _create(
        self, session_id: str, config: ChatSessionConfig, messages: Sequence[Mapping[str, Any]], *, exists_ok: bool
    ) -> ChatSession:
        with self._lock:
            existing = self._sessions.get(session_id)
        if existing is not None:
            if not exists_ok:
                raise InvalidRequestError(f"a chat session {session_id!r} already exists")
            _check_same_config(existing, config)
            return existing
        session = self._register(session_id, config, messages)
        if config.cache_warmup:
            try:
                await session._warmup()
            except BaseException:
                session._close_now()
                raise
        return session

    async def _restore(self, path: PathLike, session_id: str | None, config: ChatSessionConfig | None) -> ChatSession:
        sid = _checked_id(session_id) if session_id is not None else None
        config = _checked_config(config) if config is not None else None
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidRequestError(f"restore is a path, got {type(path).__name__}")
        kv = await saved_contexts.read_context(self.runtime, path)
        saved = parse_saved_chat(os.fspath(path), kv)
        if config is None:
            try:
                config = ChatSessionConfig(**saved.config)
            except InvalidRequestError as e:
                raise ContextFileError(f"{os.fspath(path)!r} holds a chat session with a bad config: {e}") from None
        session = self._register(sid or saved.session_id, config, saved.messages)
        try:
            await session._restore(saved, kv, os.fspath(path))
        except BaseException:
            session._close_now()
            raise
        return session

    def _register(self, session_id: str | None, config: ChatSessionConfig, messages: Sequence[Mapping[str, Any]]) -> ChatSession:
        sid = _checked_id(session_id) if session_id is not None else f"chat-{uuid.uuid4().hex[:12]}"
        session = ChatSession(self, sid, config, _checked_messages(messages))
        with self._lock:
            if sid in self._sessions:
                raise InvalidRequestError(f"a chat session {sid!r} already exists")
            self._sessions[sid] = session
        return session

    def _unregister(self, session: ChatSession) -> None:
        with self._lock:
            if self._sessions.get(session.session_id) is session:
                del self._sessions[session.session_id]

    def _get(self, session_id: str | None) -> ChatSession:
        sid = self.DEFAULT_SESSION_ID if session_id is None else session_id
        with self._lock:
            session = self._sessions.get(sid)
        if session is None:
            raise UnknownSessionError(f"no chat session {sid!r} (never created, or removed)")
        return session


def _checked_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not session_id:
        raise InvalidRequestError(f"a chat session id is a non-empty string, got {session_id!r}")
    return session_id


def _checked_config(config: object) -> ChatSessionConfig:
    if config is None:
        return ChatSessionConfig()
    if not isinstance(config, ChatSessionConfig):
        raise InvalidRequestError(f"config must be a ChatSessionConfig, got {type(config).__name__}")
    return config


def _check_same_config(session: ChatSession, config: ChatSessionConfig | None) -> None:
    if config is not None and config != session.config:
        raise InvalidRequestError(
            f"chat session {session.session_id!r} exists with {session.config}; it cannot take {config}"
        )
