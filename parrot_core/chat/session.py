"""`ChatSession`: a multi-turn conversation that keeps its KV cache across turns.

The session holds one context whose tokens are exactly the conversation so far: the rendered
template text it tokenized itself and the token ids the model generated (never re-tokenized).
The context is a child of a `SharedPrefix` holding the system prompt, which every session of
the runtime with that system prompt shares.

A turn renders the conversation with the model's chat template, matches the rendering against
what the context holds (`transcript.match_segments`: exact at the token level), and runs one
engine generate whose prompt is only the tokens past the longest valid prefix: normally just
the new user turn and the template's markers (starting with the end-of-turn marker of the
previous reply, which the engine never appends). The generate runs in a new context that
shares the kept tokens' KV with the session's (`engine.split`); when the reply is complete that
context becomes the session's. So a turn that fails, is cancelled or is abandoned (a stream
closed early) leaves the session exactly as it was, and an edited history never reuses KV of a
token that changed.

Threads: a session's turns and edits are serialized by one asyncio lock on the runtime's loop;
different sessions run concurrently. Reads (`messages`, `cache_info()`, ...) see one immutable
snapshot of the session's state and never wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from parrot_core.chat.saved import SavedChat, chat_extra
from parrot_core.chat.shared import SharedPrefix, SharedPrefixes
from parrot_core.chat.transcript import Segment, common_prefix_len, match_segments, token_ids_of
from parrot_core.contexts import Context
from parrot_core.engines.base import FINISH_ABORT, SamplingParams
from parrot_core.errors import InvalidRequestError, RequestTooLargeError, UnknownSessionError
from parrot_core.frontend import saved_contexts
from parrot_core.frontend.runtime import GenerateOutput, Runtime, StreamDelta, _sampling_params, collect
from parrot_core.frontend.saved_contexts import ContextFileError, ContextKV, PathLike
from parrot_core.serve.scheduler import SchedTask

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from parrot_core.chat.manager import ChatSessionManager

Message = Mapping[str, Any]
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class ChatSessionConfig:
    """`max_context_length`: the most tokens one turn may use (the conversation's tokens plus
    `max_tokens`); over it the oldest turns are dropped (the system prompt stays). The model's
    own limit and the KV pool's size bound it too. `cache_warmup`: fill the system prompt when
    the session is created instead of at its first turn."""

    max_context_length: int = 4096
    cache_warmup: bool = True

    def __post_init__(self) -> None:
        n = self.max_context_length
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidRequestError(f"max_context_length must be an integer >= 1, got {n!r}")
        if not isinstance(self.cache_warmup, bool):
            raise InvalidRequestError(f"cache_warmup must be a bool, got {self.cache_warmup!r}")


@dataclass(frozen=True)
class _State:
    """What a session holds; replaced as a whole, so readers in any thread see one snapshot.
    `own` (a child of `root`'s context, or a root itself) holds `root.token_ids` followed by
    the tokens of `segments`."""

    messages: tuple[Mapping[str, Any], ...] = ()
    root: SharedPrefix | None = None
    own: Context | None = None
    segments: tuple[Segment, ...] = ()
    turns_dropped: int = 0

    @property
    def token_ids(self) -> list[int]:
        return [*(self.root.token_ids if self.root else ()), *token_ids_of(self.segments)]


@dataclass(frozen=True)
class _Plan:
    """A turn's prompt: `messages` rendered as `root_ids` (the shared system prompt, if any)
    then `segments`. The first `keep` tokens are reused (from the root and the session's
    context); `new_ids` follow them and are computed."""

    messages: tuple[Mapping[str, Any], ...]
    system_text: str | None
    root_ids: tuple[int, ...]
    segments: tuple[Segment, ...]
    keep: int
    new_ids: list[int]
    dropped: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.keep + len(self.new_ids)


class ChatSession:
    """A conversation whose KV stays cached between turns. Create it with `rt.chat(...)` or
    `rt.chat_sessions.get_session(...)`. Blocking methods, their `a`-prefixed async forms,
    and `with` (closes it)."""

    def __init__(
        self, manager: ChatSessionManager, session_id: str, config: ChatSessionConfig, messages: Sequence[Message] = ()
    ) -> None:
        self._manager = manager
        self._rt: Runtime = manager.runtime
        self._prefixes: SharedPrefixes = manager.prefixes
        self._tok = self._rt._tokenizer()
        if not self._tok.chat_template:
            raise InvalidRequestError("this model has no chat template: chat sessions need one")
        self.session_id = session_id
        self.config = config
        self._lock = asyncio.Lock()  # serializes this session's turns and edits (on the runtime's loop)
        self._state = _State(messages=_checked_messages(messages))
        self._closed = False

    def __repr__(self) -> str:
        s = self._state
        return f"ChatSession(id={self.session_id!r}, messages={len(s.messages)}, tokens={len(s.token_ids)}, closed={self._closed})"

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading (never waits) ---------------------------------------------------------------
    @property
    def messages(self) -> list[dict[str, Any]]:
        """A copy of the conversation: `{"role": ..., "content": ...}` dicts, oldest first."""
        return [dict(m) for m in self._state.messages]

    @messages.setter
    def messages(self, messages: Sequence[Message]) -> None:
        self.set_messages(messages)

    @property
    def system_prompt(self) -> str | None:
        m = self._state.messages
        return m[0]["content"] if m and m[0]["role"] == "system" else None

    @property
    def token_ids(self) -> list[int]:
        """The exact tokens the session's context holds (system prompt, turns, the model's
        replies as generated)."""
        return self._state.token_ids

    @property
    def closed(self) -> bool:
        return self._closed

    def prompt_tokens(self, text: str) -> int:
        """The tokens a turn with the user message `text` would hold before generating (the
        whole conversation, system prompt included), without dropping any turn."""
        state = self._state
        return self._match(state, (*state.messages, {"role": "user", "content": text})).prompt_tokens

    def cache_info(self) -> dict[str, Any]:
        """`context_length`: tokens the session's KV holds; `turns_dropped`: oldest turns
        dropped so far to stay within `max_context`; `shared_prefix_tokens`: of the context's
        tokens, those in the shared system-prompt context."""
        s = self._state
        length = len(s.token_ids)
        return {
            "session_id": self.session_id,
            "has_cache": s.root is not None or s.own is not None,
            "context_length": length,
            "is_prefilled": length > 0,
            "message_count": len(s.messages),
            "max_context": self.config.max_context_length,
            "turns_dropped": s.turns_dropped,
            "shared_prefix_tokens": len(s.root.token_ids) if s.root else 0,
            "closed": self._closed,
        }

    def should_invalidate(self, messages: Sequence[Message]) -> bool:
        """True if a conversation of `messages` (rendered for the assistant's next reply)
        does not start with every token the session's context holds, so some of its KV
        could not be reused. Changes nothing."""
        state = self._state
        if not state.token_ids:
            return False
        return self._match(state, _checked_messages(messages)).keep < len(state.token_ids)

    # -- turns -------------------------------------------------------------------------------
    def send(self, text: str, max_tokens: int = DEFAULT_MAX_TOKENS, **sampling: Any) -> GenerateOutput:
        """Add a user message and generate the reply (added as the assistant's message).
        `prompt_tokens`: the conversation's tokens this turn; `cached_tokens`: of those, the
        ones not sent to the engine again (what the session's context already held, model
        replies included, and what the prefix cache supplied; their KV is reused unless memory
        pressure evicted it). Sampling options as for `Runtime.generate`."""
        params = _turn_params(max_tokens, sampling)
        return self._rt._run(self._collect(_checked_text(text), params))

    async def asend(self, text: str, max_tokens: int = DEFAULT_MAX_TOKENS, **sampling: Any) -> GenerateOutput:
        params = _turn_params(max_tokens, sampling)
        return await self._rt._on_loop(self._collect(_checked_text(text), params))

    def stream(self, text: str, max_tokens: int = DEFAULT_MAX_TOKENS, **sampling: Any) -> Iterator[StreamDelta]:
        """`send`, yielding `StreamDelta`s as they come. The reply joins the conversation just
        before the last delta (the one with `finish_reason`) is yielded; leaving the loop
        earlier abandons the turn and leaves the session as it was."""
        params = _turn_params(max_tokens, sampling)
        text = _checked_text(text)
        return self._rt._stream_sync(lambda: self._turn(text, params))

    def astream(self, text: str, max_tokens: int = DEFAULT_MAX_TOKENS, **sampling: Any) -> AsyncIterator[StreamDelta]:
        params = _turn_params(max_tokens, sampling)
        text = _checked_text(text)
        return self._rt._stream_async(lambda: self._turn(text, params))

    async def _collect(self, text: str, params: SamplingParams) -> GenerateOutput:
        async with contextlib.aclosing(self._turn(text, params)) as deltas:
            return await collect(deltas)

    async def _turn(self, text: str, params: SamplingParams) -> AsyncIterator[StreamDelta]:
        rt = self._rt
        async with self._lock:
            self._require_open()
            before = self._state = self._off_down_engines(self._state)
            plan = self._plan(before, (*before.messages, {"role": "user", "content": text}), params.max_tokens)
            acquired: SharedPrefix | None = None
            work: Context | None = None
            committed = False
            try:
                root, root_computed = (before.root if plan.system_text is not None else None), 0
                if plan.system_text is not None and (root is None or root.text != plan.system_text):
                    acquired, root_computed = await self._prefixes.acquire(plan.system_text, plan.root_ids, self._hint(before))
                    root = acquired
                work = await self._carve(root, before, plan.keep)
                ids: list[int] = []
                pieces: list[str] = []
                task = SchedTask(None, [len(plan.new_ids)], params.max_tokens, required_engine=work.engine_id, prior_tokens=work.chain_tokens)
                async with rt.core.scheduler.admit(task):
                    rt.contexts.record_fill(work, len(plan.new_ids))
                    async with contextlib.aclosing(rt._stream_in(work, params, plan.new_ids)) as deltas:
                        async for d in deltas:
                            ids.extend(d.token_ids)
                            pieces.append(d.text)
                            if d.finish_reason is not None and d.finish_reason != FINISH_ABORT:
                                self._commit(before, plan, root, work, ids, "".join(pieces))
                                committed = True
                            cached = plan.keep - root_computed + d.cached_tokens
                            yield StreamDelta(
                                list(d.token_ids), d.text, d.finish_reason, plan.prompt_tokens, cached, d.logprobs, None, d.stop_token_id
                            )
            finally:
                if not committed:
                    if work is not None and work.alive:
                        rt.contexts.free_context(work)
                    if acquired is not None:
                        self._prefixes.release(acquired)

    def _commit(
        self, before: _State, plan: _Plan, root: SharedPrefix | None, work: Context, ids: list[int], text: str
    ) -> None:
        """The reply is complete: `work` becomes the session's context."""
        if self._closed:
            raise UnknownSessionError(f"chat session {self.session_id!r} was closed during the turn")
        segments = plan.segments
        if ids:  # the reply as generated; its text is their exact decoding, special tokens included
            segments = (*segments, Segment(self._tok.decode(ids, skip_special_tokens=False), tuple(ids)))
        self._state = _State(
            messages=(*plan.messages, {"role": "assistant", "content": text}),
            root=root,
            own=work,
            segments=segments,
            turns_dropped=before.turns_dropped + plan.dropped,
        )
        if before.own is not None:
            self._rt.contexts.free_context(before.own)
        if before.root is not None and before.root is not root:
            self._prefixes.release(before.root)

    # -- planning (pure) ---------------------------------------------------------------------
    def _plan(self, state: _State, messages: tuple[Mapping[str, Any], ...], max_tokens: int) -> _Plan:
        """The turn's prompt, dropping the oldest turns until it fits; `RequestTooLargeError`
        if even the system prompt and the new message alone do not."""
        info = self._rt.engine.runtime_info()
        pool = info.num_blocks_total * info.block_size
        limit = min(self.config.max_context_length, self._rt.engine.max_model_len, pool)
        dropped = 0
        while True:
            plan = self._match(state, messages)
            if plan.prompt_tokens + max_tokens <= limit:
                return replace(plan, dropped=dropped)
            shorter = _drop_oldest_turn(messages)
            if shorter is None:
                raise RequestTooLargeError(
                    f"this turn needs {plan.prompt_tokens + max_tokens} tokens ({plan.prompt_tokens} for the system prompt"
                    f" and the new message alone, {max_tokens} to generate) but a turn of this session may use at most"
                    f" {limit} (max_context_length {self.config.max_context_length}, the model's"
                    f" {self._rt.engine.max_model_len}, the KV pool's {pool})"
                )
            messages, dropped = shorter, dropped + 1

    def _match(self, state: _State, messages: tuple[Mapping[str, Any], ...]) -> _Plan:
        text = self._tok.apply_chat_template(messages, add_generation_prompt=True)
        system = self._system_text(messages)
        if system is not None and not text.startswith(system):
            system = None  # this template does not render the system prompt on its own: no shared root
        start = len(system) if system else 0
        if system == (state.root.text if state.root else None):
            root_ids = state.root.token_ids if state.root else ()
            m = match_segments(state.segments, text, start, self._encode)
            return _Plan(messages, system, root_ids, m.segments, len(root_ids) + m.reused, m.new_ids)
        # Another system prompt (or none any more): a new root; without one, what the old
        # context shares with the new tokens is still reused.
        root_ids = tuple(self._tok.encode_prompt(system)) if system else ()
        tail = self._encode(text[start:], start == 0)
        segments = (Segment(text[start:], tuple(tail)),) if tail else ()
        keep = len(root_ids) if system else common_prefix_len(state.token_ids, tail)
        return _Plan(messages, system, root_ids, segments, keep, tail[keep - len(root_ids) :])

    def _system_text(self, messages: Sequence[Message]) -> str | None:
        """The rendered system prompt on its own, if the conversation starts with one and
        the template renders it alone."""
        if not messages or messages[0]["role"] != "system":
            return None
        try:
            text = self._tok.apply_chat_template(messages[:1], add_generation_prompt=False)
        except InvalidRequestError:
            return None
        return text or None

    def _encode(self, text: str, starts_sequence: bool) -> list[int]:
        return self._tok.encode_prompt(text) if starts_sequence else self._tok.encode(text)

    @staticmethod
    def _hint(state: _State) -> tuple[Context, list[int]] | None:
        """The context holding the session's whole sequence, and that sequence."""
        source = state.own or (state.root.context if state.root else None)
        return (source, state.token_ids) if source is not None else None

    async def _carve(self, root: SharedPrefix | None, state: _State, keep: int) -> Context:
        """A new context under `root`'s (or a new root context) holding the first `keep`
        tokens of the sequence `state` holds, sharing their KV (nothing is computed)."""
        rt = self._rt
        hint = self._hint(state)
        if root is not None:
            ctx = rt.contexts.fork_context(root.context)
        else:  # beside the context it takes tokens from (split shares KV within one engine)
            ctx = rt.contexts.new_context(hint[0].engine_id if hint is not None else rt._place_root(state.token_ids))
        base = len(root.token_ids) if root else 0
        if keep > base:
            assert hint is not None, "tokens to keep but no context holding them"
            try:
                await rt._split(ctx, hint[0], len(hint[1]) - keep)
                rt.contexts.record_fill(ctx, keep - base)
            except BaseException:
                rt.contexts.free_context(ctx)
                raise
        return ctx

    # -- editing (waits for a turn in progress) ------------------------------------------------
    def add_message(self, role: str, content: str) -> None:
        """Append a message (any role the template knows). The next turn computes it."""
        message = _checked_messages([{"role": role, "content": content}])
        self._edit(lambda s: replace(s, messages=s.messages + message))

    def set_messages(self, messages: Sequence[Message]) -> None:
        """Replace the conversation. The next turn reuses the longest prefix of tokens the
        new conversation shares with the cached one and computes the rest."""
        checked = _checked_messages(messages)
        self._edit(lambda s: replace(s, messages=checked))

    def clear_messages(self) -> None:
        """Forget the conversation but keep the system prompt (and its shared KV)."""

        def clear(s: _State) -> _State:
            if s.own is not None:
                self._rt.contexts.free_context(s.own)
            system = s.messages[:1] if s.messages and s.messages[0]["role"] == "system" else ()
            return _State(messages=system, root=s.root)

        self._edit(clear)

    def invalidate_cache(self) -> None:
        """Drop the session's KV (its messages stay): the next turn computes the conversation
        again (a shared system prompt other sessions still hold is reused)."""

        def drop(s: _State) -> _State:
            self._release(s)
            return _State(messages=s.messages, turns_dropped=s.turns_dropped)

        self._edit(drop)

    def _edit(self, change: Callable[[_State], _State]) -> None:
        async def run() -> None:
            async with self._lock:
                self._require_open()
                self._state = change(self._state)

        self._rt._run(run())

    # -- save and restore ------------------------------------------------------------------------
    def save(self, path: PathLike) -> int:
        """Write the conversation to `path`, one safetensors file (a saved context: the tokens
        the session's context holds, their KV, the model's fingerprint; and, covered by its
        checksum, the messages, the transcript's segments, the system prompt and the config).
        `rt.chat(restore=path)` brings it back in any runtime on the same model without
        computing anything. Waits for a turn in progress. Returns the tokens saved. A session
        holding no KV (no system prompt and no turn yet, or after `invalidate_cache()`) is an
        `InvalidRequestError`; a path that cannot be written, a `P.ContextFileError`."""
        return self._rt._run(self._save(path))

    async def asave(self, path: PathLike) -> int:
        return await self._rt._on_loop(self._save(path))

    async def _save(self, path: PathLike) -> int:
        async with self._lock:
            self._require_open()
            state = self._state
            ctx = state.own or (state.root.context if state.root else None)
            if ctx is None:
                raise InvalidRequestError(f"chat session {self.session_id!r} holds no KV to save (no system prompt and no turn yet)")
            config = {"max_context_length": self.config.max_context_length, "cache_warmup": self.config.cache_warmup}
            root_text, root_ids = (state.root.text, state.root.token_ids) if state.root else (None, ())
            extra = chat_extra(self.session_id, config, state.messages, root_text, root_ids, state.segments, state.turns_dropped)
            return await saved_contexts.save_context(self._rt, ctx, path, extra)

    async def _restore(self, saved: SavedChat, kv: ContextKV, name: str) -> None:
        """Take the state of a fresh session from a saved file: its tokens become a root
        context (KV written, nothing computed); with a system prompt, that prompt's tokens are
        re-linked to the runtime's shared context for it (taken from the file's KV if there is
        none yet) and the session's context is carved from the rest, as a turn would leave it."""
        async with self._lock:
            self._require_open()
            if saved.system_text is not None and list(saved.root_ids) != self._tok.encode_prompt(saved.system_text):
                raise ContextFileError(f"{name!r} holds a chat session tokenized with another tokenizer than this model's")
            rt = self._rt
            loaded: Context | None = await saved_contexts.import_context(rt, kv)
            root: SharedPrefix | None = None
            own: Context | None = None
            try:
                if saved.system_text is None:
                    own, loaded = loaded, None
                else:
                    root, _ = await self._prefixes.acquire(saved.system_text, saved.root_ids, (loaded, kv.token_ids))
                    held = _State(root=root, own=loaded, segments=saved.segments)
                    own = await self._carve(root, held, len(kv.token_ids)) if saved.segments else None
                self._require_open()  # closed meanwhile (Runtime.close or reset): keep nothing
            except BaseException:
                if own is not None and own.alive:
                    rt.contexts.free_context(own)
                if root is not None:
                    self._prefixes.release(root)
                raise
            finally:
                if loaded is not None and loaded.alive:  # its KV lives on in `root` and `own` (shared, not copied)
                    rt.contexts.free_context(loaded)
            self._state = _State(messages=saved.messages, root=root, own=own, segments=saved.segments, turns_dropped=saved.turns_dropped)

    # -- fork and close ------------------------------------------------------------------------
    def fork(self, session_id: str | None = None) -> ChatSession:
        """A new session (registered with the runtime's manager) holding this conversation; its
        context shares this one's KV. The two then go their own ways."""
        return self._rt._run(self._fork(session_id))

    async def _fork(self, session_id: str | None) -> ChatSession:
        async with self._lock:
            self._require_open()
            state = self._state
            child = self._manager._register(session_id, self.config, state.messages)
            try:
                own = await self._carve(state.root, state, len(state.token_ids)) if state.own is not None else None
            except BaseException:
                child._close_now()
                raise
            if state.root is not None:
                self._prefixes.retain(state.root)
            child._state = replace(state, own=own)
            return child

    async def _warmup(self) -> None:
        """Fill the system prompt now (the shared one, if another session already did)."""
        async with self._lock:
            self._require_open()
            state = self._state
            system = self._system_text(state.messages)
            if system is None or state.root is not None:
                return
            prefix, _ = await self._prefixes.acquire(system, self._tok.encode_prompt(system))
            if self._closed:
                self._prefixes.release(prefix)
                self._require_open()
            self._state = replace(state, root=prefix)

    def close(self) -> None:
        """Free the session's KV and remove it from the runtime's sessions (after a turn in
        progress ends). Idempotent."""
        if self._closed:
            return

        async def run() -> None:
            async with self._lock:
                self._close_now()

        self._rt._run(run())

    def _close_now(self) -> None:
        """Close without waiting for a turn in progress (it fails and frees its own context)."""
        if self._closed:
            return
        self._closed = True
        self._release(self._state)
        self._state = _State(messages=self._state.messages, turns_dropped=self._state.turns_dropped)
        self._manager._unregister(self)

    def _off_down_engines(self, state: _State) -> _State:
        """`state`, or, if its KV is on an engine that is down (closed, or resting after
        failures) or is gone, the same conversation holding no KV: the turn then computes it
        on an engine that is up, as a fresh session would, instead of failing every turn."""
        held = [c for c in (state.own, state.root.context if state.root else None) if c is not None]
        if all(self._rt._on_engine_up(c) for c in held):
            return state
        log.warning("chat session %r: its KV is on engine(s) %s, which are down or gone; recomputing the conversation",
                    self.session_id, sorted({str(c.engine_id) for c in held}))  # fmt: skip
        self._release(state)
        return _State(messages=state.messages, turns_dropped=state.turns_dropped)

    def _release(self, state: _State) -> None:
        if state.own is not None and state.own.alive:
            self._rt.contexts.free_context(state.own)
        if state.root is not None:
            self._prefixes.release(state.root)

    def _require_open(self) -> None:
        if self._closed:
            raise UnknownSessionError(f"chat session {self.session_id!r} is closed")


# -------------------------------------------------------------------------------- helpers


def _turn_params(max_tokens: int, sampling: dict[str, Any]) -> SamplingParams:
    """A turn's sampling. Its prompt is only the new tokens, so per-prompt-token logprobs
    would describe a fragment: refused (`rt.generate(..., prompt_logprobs=k)` has them)."""
    params = _sampling_params(max_tokens, sampling)
    if params.prompt_logprobs is not None:
        raise InvalidRequestError("prompt_logprobs is not supported on a chat session turn (use rt.generate)")
    return params


def _checked_text(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidRequestError(f"a chat message is a string, got {type(text).__name__}")
    return text


def _checked_messages(messages: Sequence[Message]) -> tuple[Mapping[str, Any], ...]:
    """Private copies of `messages`, each with a non-empty string role and a string content."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequestError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not m["role"] or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"message {i} must be a dict with a non-empty string 'role' and a string 'content', got {m!r}")
        out.append(dict(m))
    return tuple(out)


def _drop_oldest_turn(messages: tuple[Mapping[str, Any], ...]) -> tuple[Mapping[str, Any], ...] | None:
    """`messages` without their oldest turn (a message and those after it up to the next user
    message); the system prompt and the last message (the new one) always stay. None if only
    those are left."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    body = messages[start:-1]
    if not body:
        return None
    end = 1
    while end < len(body) and body[end]["role"] != "user":
        end += 1
    return (*messages[:start], *body[end:], messages[-1])


