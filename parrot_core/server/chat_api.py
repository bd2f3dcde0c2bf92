"""Chat sessions over HTTP, and the sessions behind `/v1/chat/completions`' `prompt_cache_key`.

    POST   /v1/chat/sessions                 -> {id, token, object: "chat.session"}
    POST   /v1/chat/sessions/{id}/messages   -> chat.completion (or its chunks as SSE)
    GET    /v1/chat/sessions/{id}            -> cache_info() and the messages
    DELETE /v1/chat/sessions/{id}            -> frees the session's KV
    POST   /v1/chat/sessions/{id}/save       -> {name}: the conversation and its KV to a file
    POST   /v1/chat/sessions/{id}/restore    -> {name}: the session becomes the saved one

Save and restore use files named `<name>.safetensors` in the server's `--chat-save-dir`
(never a path the client chooses; without the flag both answer 400). A restore brings the
conversation back with its KV, nothing recomputed; the session keeps its id and token. A
missing file is a 404; a file from another model or a damaged one is a 400 and changes nothing.

Every call of a session carries its token in the `X-Session-Token` header: 401 without it or
with another one, 404 for an id the server does not hold (never created, deleted, expired).
A session with no call for `--session-timeout` seconds is closed (its KV freed, its token
forgotten) by `ChatSessions.expire_idle`, which the server's sweeper runs.

A turn is one `ChatSession.astream` run through the chat-completions machinery: a client that
goes away aborts it and leaves the session as it was; a streamed turn waits for its first
delta before the status line, so a turn that can never run is a plain HTTP error (400).

`prompt_cache_key`: each key names a chat session of its own (never reachable by the routes
above), kept for at most `--max-prompt-cache-keys` keys (least recently used dropped first)
and expiring like the others. A request with a key replaces the session's messages by its
own and runs its last (user) message as a turn, so the longest common token prefix with the
key's previous conversation, the model's reply tokens included, is reused; requests of one
key run one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from parrot_core.chat import ChatSession, ChatSessionConfig
from parrot_core.chat.session import DEFAULT_MAX_TOKENS
from parrot_core.errors import RuntimeClosedError
from parrot_core.server.http_errors import ERROR_RESPONSES, STREAM_RESPONSE, APIError
from parrot_core.server.openai_api import _max_tokens_for, _Seq, check_api_key, check_sampling, generate_chat, get_state
from parrot_core.server.openai_schemas import ChatCompletionResponse, ChatLogprobsRequest, TextPart

if TYPE_CHECKING:
    from parrot_core.frontend.runtime import Runtime, StreamDelta

SESSION_HEADER = "x-session-token"


# -- request and response models -------------------------------------------------------------
class CreateChatSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system: str | None = None
    max_context_length: int | None = Field(None, ge=1, le=2**31)
    cache_warmup: bool | None = Field(None, strict=True)


class ChatSessionCreated(BaseModel):
    id: str
    object: Literal["chat.session"] = "chat.session"
    token: str
    created: int


class ChatSessionMessageRequest(ChatLogprobsRequest):
    """One turn: `content` is the user's message; sampling as for `/v1/chat/completions`
    (`n` must be 1). Without `max_tokens`, at most `DEFAULT_MAX_TOKENS` are generated."""

    content: str | list[TextPart]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SessionMessage(BaseModel):
    role: str
    content: str


class ChatSessionInfo(BaseModel):
    """`ChatSession.cache_info()` plus the conversation."""

    model_config = ConfigDict(extra="allow")  # whatever else cache_info() reports

    id: str
    object: Literal["chat.session"] = "chat.session"
    session_id: str
    has_cache: bool
    context_length: int
    is_prefilled: bool
    message_count: int
    max_context: int
    messages: list[SessionMessage]


class SavedChatRequest(BaseModel):
    """A file in the server's `--chat-save-dir`: `name` becomes `<name>.safetensors`."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ChatSessionSaved(BaseModel):
    id: str
    object: Literal["chat.session.saved"] = "chat.session.saved"
    name: str
    tokens: int


class ChatSessionDeleted(BaseModel):
    id: str
    object: Literal["chat.session.deleted"] = "chat.session.deleted"
    deleted: bool = True


# -- the sessions the server holds ------------------------------------------------------------
@dataclass(eq=False)
class _Held:
    """A chat session held by the server: an HTTP session (with its `token`) or the session of
    a prompt_cache_key (made on its first request). Touched only on the server's loop."""

    token: str | None = None
    session: ChatSession | None = None
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # calls in progress: never idle meanwhile
    dropped: bool = False  # no longer held (evicted, expired, deleted): closed once free
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # a key's requests, one at a time
    _making: asyncio.Future[ChatSession] | None = None

    @property
    def closed(self) -> bool:
        """Its session was closed under the server (e.g. by `Runtime.reset()`)."""
        return self.session is not None and self.session.closed

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        self.busy += 1
        self.last_used = time.monotonic()
        try:
            yield
        finally:
            self.busy -= 1
            self.last_used = time.monotonic()

    async def ensure(self, make: Callable[[], ChatSession]) -> ChatSession:
        """The session, made by `make` in a worker thread on first use. A caller cancelled
        meanwhile lets the making finish, so a made session is never lost (`settled`)."""
        if self.session is None:
            making = self._making
            if making is None or (making.done() and (making.cancelled() or making.exception() is not None)):
                making = self._making = asyncio.ensure_future(asyncio.to_thread(make))
            self.session = await asyncio.shield(making)
        return self.session

    async def settled(self) -> ChatSession | None:
        """The session once any making in progress is over; None if none was made."""
        if self.session is None and self._making is not None:
            with contextlib.suppress(Exception):
                self.session = await asyncio.shield(self._making)
        return self.session


class ChatSessions:
    """The chat sessions of one server: HTTP sessions by id (at most `max_sessions` open; one
    more is a 429, never an eviction: a client holds each one's id and token) and
    prompt_cache_key sessions by key (an LRU of at most `max_keys`). Only touched from the
    server's event loop."""

    def __init__(self, max_keys: int, max_sessions: int) -> None:
        self.max_keys, self.max_sessions = max_keys, max_sessions
        self.by_id: dict[str, _Held] = {}
        self._creating = 0  # HTTP sessions being made (counted against max_sessions)
        self.by_key: OrderedDict[str, _Held] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    # -- HTTP sessions -------------------------------------------------------------------------
    async def create(self, rt: Runtime, system: str | None, config: ChatSessionConfig) -> tuple[str, str]:
        """A new session and its token; 429 if `max_sessions` are open (or being made)."""
        for session_id, held in list(self.by_id.items()):  # those closed under the server do not count
            if held.closed:
                self._drop(self.by_id, session_id)
        open_now = len(self.by_id) + self._creating
        if open_now >= self.max_sessions:
            raise APIError(
                429,
                f"{open_now} chat sessions are open, the most this server keeps (--max-chat-sessions {self.max_sessions});"
                " delete one (DELETE /v1/chat/sessions/{id}) or wait for an idle one to expire (--session-timeout)",
            )
        self._creating += 1
        try:
            session = await asyncio.to_thread(rt.chat, system, None, config)
        finally:
            self._creating -= 1
        token = secrets.token_urlsafe(24)
        self.by_id[session.session_id] = _Held(token=token, session=session)
        return session.session_id, token

    def check(self, session_id: str, token: str | None) -> _Held:
        """The session `session_id` if `token` is its token: 404 for an unknown id (or one
        whose session was closed under the server, e.g. by `Runtime.reset()`), 401 for a
        missing or wrong token."""
        held = self.by_id.get(session_id)
        if held is None or held.session is None or held.session.closed:
            if held is not None:
                self._drop(self.by_id, session_id)
            raise APIError(404, f"unknown chat session {session_id!r}", param="session_id")
        assert held.token is not None
        if not token or not hmac.compare_digest(token.encode(), held.token.encode()):
            raise APIError(401, f"missing or wrong session token; send the `{SESSION_HEADER}` header")
        held.last_used = time.monotonic()
        return held

    async def restore(self, rt: Runtime, session_id: str, path: str) -> None:
        """Replace the session's conversation by the one saved at `path`, keeping its id and
        token: the old one is closed only once the restore succeeded (a bad file changes
        nothing)."""
        held = self.by_id[session_id]
        with held.in_use():
            restored = await asyncio.to_thread(rt.chat, None, None, None, path)
            old, held.session = held.session, restored
        if old is not None:
            await asyncio.to_thread(old.close)

    async def remove(self, session_id: str) -> None:
        """Forget the session and close it (after a turn in progress), freeing its KV."""
        held = self.by_id.pop(session_id)
        held.dropped = True
        await self._close(held)

    # -- prompt_cache_key sessions ---------------------------------------------------------------
    def keyed_turn(
        self, rt: Runtime, key: str, messages: Sequence[Mapping[str, str]], requested: int | None, sampling: dict[str, Any]
    ) -> Callable[[], AsyncIterator[StreamDelta]]:
        """The deltas of `messages` (ending with a user message) run as a turn of `key`'s
        session, for `_Seq.source`. `requested`: max_tokens, or None for all the room left."""
        history, text = list(messages[:-1]), messages[-1]["content"]
        config = ChatSessionConfig(max_context_length=rt.max_model_len, cache_warmup=False)

        async def turn() -> AsyncIterator[StreamDelta]:
            while True:
                held = self._keyed(key)
                async with held.lock:
                    if held.dropped:  # evicted while this request waited: take the key's new one
                        continue
                    assert self.by_key.get(key) is held
                    with held.in_use():
                        session = await held.ensure(lambda: rt.chat(config=config))
                        if session.closed:  # closed under the server (`Runtime.reset()`): start afresh
                            self._drop(self.by_key, key)
                            continue
                        max_tokens = await asyncio.to_thread(_set_history, rt, session, history, text, requested)
                        async with contextlib.aclosing(session.astream(text, max_tokens, **sampling)) as deltas:
                            async for delta in deltas:
                                yield delta
                    return

        return turn

    def _keyed(self, key: str) -> _Held:
        """`key`'s entry, now the most recently used; a new one may drop the least recently
        used beyond `max_keys`."""
        held = self.by_key.get(key)
        if held is not None:
            self.by_key.move_to_end(key)
        else:
            held = self.by_key[key] = _Held()
            while len(self.by_key) > self.max_keys:
                self._drop(self.by_key, next(iter(self.by_key)))
        held.last_used = time.monotonic()
        return held

    # -- expiry and closing ---------------------------------------------------------------------
    def expire_idle(self, timeout: float) -> list[str]:
        """Drop every session (HTTP or keyed) with no call for `timeout` seconds, and those
        closed under the server; they are closed in the background (`wait_closed`). Returns
        the HTTP session ids and keys dropped."""
        now = time.monotonic()
        gone = []
        for table in (self.by_id, self.by_key):
            for name, held in list(table.items()):
                if held.closed or (not held.busy and not held.lock.locked() and now - held.last_used >= timeout):
                    self._drop(table, name)
                    gone.append(name)
        return gone

    async def close_all(self) -> None:
        """Close every session the server holds (when it stops) and wait for the closing."""
        for table in (self.by_id, self.by_key):
            for name in list(table):
                self._drop(table, name)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the sessions dropped so far are closed."""
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _drop(self, table: dict[str, _Held], name: str) -> None:
        """Forget `name`'s session and close it in the background (after its turn)."""
        held = table.pop(name)
        held.dropped = True
        task = asyncio.get_running_loop().create_task(self._close(held))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(held: _Held) -> None:
        async with held.lock:  # a keyed turn in progress ends first
            session = await held.settled()
            if session is not None and not session.closed:
                with contextlib.suppress(RuntimeClosedError):  # closing the runtime closed it
                    await asyncio.to_thread(session.close)


def _set_history(rt: Runtime, session: ChatSession, history: list[Mapping[str, str]], text: str, requested: int | None) -> int:
    """Make `history` the keyed session's conversation; return the turn's max_tokens (all the
    room left if `requested` is None), or 400 if the turn cannot fit. Counted on the session's
    own tokens (the model's replies as generated), so the session never drops a turn to fit.
    Blocking."""
    session.set_messages(history)
    return _max_tokens_for(rt, session.prompt_tokens(text), requested, "messages")


# -- routes -----------------------------------------------------------------------------------
router = APIRouter(dependencies=[Depends(check_api_key)], responses=ERROR_RESPONSES)


def chat_sessions(request: Request) -> ChatSessions:
    return request.app.state.chat_sessions


def _held(request: Request, session_id: str) -> _Held:
    return chat_sessions(request).check(session_id, request.headers.get(SESSION_HEADER))


@router.post("/v1/chat/sessions", response_model=ChatSessionCreated)
async def create_chat_session(request: Request, body: CreateChatSessionRequest) -> ChatSessionCreated:
    """A new chat session (`system`: its system prompt; `max_context_length` and
    `cache_warmup` as in `ChatSessionConfig`; `{}` for the defaults) and the token its later
    calls must carry."""
    rt = get_state(request).require_runtime()
    options = body.model_dump(exclude={"system"}, exclude_none=True)
    session_id, token = await chat_sessions(request).create(rt, body.system, ChatSessionConfig(**options))
    return ChatSessionCreated(id=session_id, token=token, created=int(time.time()))


@router.post("/v1/chat/sessions/{session_id}/messages", response_model=ChatCompletionResponse, responses=STREAM_RESPONSE)
async def send_chat_message(request: Request, session_id: str, body: ChatSessionMessageRequest) -> Any:
    """One turn of the session, answered as `/v1/chat/completions` answers."""
    t0 = time.perf_counter()
    state = get_state(request)
    rt = state.require_runtime()
    held = _held(request, session_id)
    state.check_model(body.model)
    body.check_supported()
    if body.n != 1:
        raise APIError(400, "a chat session turn has one choice: n must be 1", param="n")
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = requested if requested is not None else DEFAULT_MAX_TOKENS
    sampling = body.sampling()
    check_sampling(max_tokens, sampling, body)
    session, text = held.session, body.text
    assert session is not None

    async def turn() -> AsyncIterator[StreamDelta]:
        with held.in_use():
            async with contextlib.aclosing(session.astream(text, max_tokens, **sampling)) as deltas:
                async for delta in deltas:
                    yield delta

    seq = _Seq(0, [], max_tokens, sampling, source=turn)
    return await generate_chat(request, state, rt, [seq], t0, body, prime=True)


@router.get("/v1/chat/sessions/{session_id}", response_model=ChatSessionInfo)
async def get_chat_session(request: Request, session_id: str) -> ChatSessionInfo:
    session = _held(request, session_id).session
    assert session is not None
    messages = [SessionMessage(role=m["role"], content=m["content"]) for m in session.messages]
    return ChatSessionInfo(id=session_id, messages=messages, **session.cache_info())


@router.delete("/v1/chat/sessions/{session_id}", response_model=ChatSessionDeleted)
async def delete_chat_session(request: Request, session_id: str) -> ChatSessionDeleted:
    _held(request, session_id)
    await chat_sessions(request).remove(session_id)
    return ChatSessionDeleted(id=session_id)


def _save_path(request: Request, name: str) -> str:
    directory = get_state(request).settings.chat_save_dir
    if directory is None:
        raise APIError(400, "saving chat sessions is disabled: start the server with --chat-save-dir", param="name")
    return os.path.join(directory, f"{name}.safetensors")


@router.post("/v1/chat/sessions/{session_id}/save", response_model=ChatSessionSaved)
async def save_chat_session(request: Request, session_id: str, body: SavedChatRequest) -> ChatSessionSaved:
    """Write the conversation and its KV to `<name>.safetensors` in `--chat-save-dir`."""
    held = _held(request, session_id)
    path = _save_path(request, body.name)
    session = held.session
    assert session is not None
    with held.in_use():
        tokens = await asyncio.to_thread(session.save, path)
    return ChatSessionSaved(id=session_id, name=body.name, tokens=tokens)


@router.post("/v1/chat/sessions/{session_id}/restore", response_model=ChatSessionInfo)
async def restore_chat_session(request: Request, session_id: str, body: SavedChatRequest) -> ChatSessionInfo:
    """Make the session the one saved as `<name>` (its KV loaded, nothing recomputed)."""
    rt = get_state(request).require_runtime()
    _held(request, session_id)
    path = _save_path(request, body.name)
    if not os.path.isfile(path):
        raise APIError(404, f"no saved chat session named {body.name!r}", param="name")
    await chat_sessions(request).restore(rt, session_id, path)
    return await get_chat_session(request, session_id)
