"""A chat session's state in a saved-context file (`session.save(path)`, `rt.chat(restore=path)`).

The file is the one `Runtime.save_context` writes (engines/builtin/kv_io.py: the tokens, their
KV, the model's fingerprint, a checksum); the conversation rides in its `extra` metadata under
`CHAT_KEY`, covered by the checksum, as one JSON object (format version `CHAT_FORMAT_VERSION`):

    {"version": 1, "session_id": str, "config": {"max_context_length": int, "cache_warmup": bool},
     "messages": [{"role": str, "content": str, ...}, ...],
     "system": {"text": str, "num_tokens": int} | null,     # the shared system-prompt root
     "segments": [{"text": str, "num_tokens": int}, ...],   # the transcript after it
     "turns_dropped": int}

Token ids are not repeated there: the file's `token_ids` are the root's then each segment's, in
order, so a segment's ids are the next `num_tokens` of them (checked to add up exactly).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from parrot_core.chat.transcript import Segment
from parrot_core.errors import InvalidRequestError
from parrot_core.frontend.saved_contexts import ContextFileError, ContextKV

CHAT_KEY = "parrot_chat"
CHAT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SavedChat:
    """What a file holds of a chat session: `root_ids` (the shared system prompt `system_text`
    rendered, or empty) then `segments` make up the file's tokens."""

    session_id: str
    config: dict[str, Any]
    messages: tuple[dict[str, Any], ...]
    system_text: str | None
    root_ids: tuple[int, ...]
    segments: tuple[Segment, ...]
    turns_dropped: int


def chat_extra(
    session_id: str,
    config: Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    system_text: str | None,
    root_ids: Sequence[int],
    segments: Sequence[Segment],
    turns_dropped: int,
) -> dict[str, str]:
    """The `extra` strings holding a session's state. Messages whose values JSON cannot hold
    are an `InvalidRequestError`."""
    state = {
        "version": CHAT_FORMAT_VERSION,
        "session_id": session_id,
        "config": dict(config),
        "messages": [dict(m) for m in messages],
        "system": None if system_text is None else {"text": system_text, "num_tokens": len(root_ids)},
        "segments": [{"text": s.text, "num_tokens": len(s.token_ids)} for s in segments],
        "turns_dropped": turns_dropped,
    }
    try:
        return {CHAT_KEY: json.dumps(state, ensure_ascii=False)}
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"this chat session's messages cannot be saved (not JSON): {e}") from None


def parse_saved_chat(name: str, kv: ContextKV) -> SavedChat:
    """The chat session in the saved context `kv` (read from `name`). A file without one (a
    plain saved context), of another chat format version, or whose state does not add up to
    its tokens is a `ContextFileError`."""
    raw = kv.extra.get(CHAT_KEY)
    if raw is None:
        raise ContextFileError(
            f"{name!r} holds a saved context but no chat session (saved with Runtime.save_context?"
            " load it with Runtime.load_context)"
        )
    try:
        state = json.loads(raw)
        version = state["version"]
        if version != CHAT_FORMAT_VERSION:
            raise ContextFileError(
                f"{name!r} holds a chat session of format version {version!r}; this parrot-core reads version {CHAT_FORMAT_VERSION}"
            )
        return _parse(state, kv.token_ids)
    except ContextFileError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ContextFileError(f"{name!r} holds a chat session state that does not fit its tokens: {e!r}") from None


def _parse(state: dict[str, Any], token_ids: list[int]) -> SavedChat:
    session_id, config, turns = state["session_id"], state["config"], state["turns_dropped"]
    messages = tuple(dict(m) for m in state["messages"])
    _require(isinstance(session_id, str) and session_id, "session_id is not a non-empty string")
    _require(isinstance(config, dict) and set(config) == {"max_context_length", "cache_warmup"}, f"config is {config!r}")
    _require(isinstance(turns, int) and turns >= 0, f"turns_dropped is {turns!r}")
    for m in messages:
        _require(isinstance(m.get("role"), str) and m["role"] and isinstance(m.get("content"), str), f"a message is {m!r}")
    pos = 0

    def take(piece: dict[str, Any]) -> tuple[str, tuple[int, ...]]:
        nonlocal pos
        text, n = piece["text"], piece["num_tokens"]
        _require(isinstance(text, str) and isinstance(n, int) and 0 <= n <= len(token_ids) - pos, f"a piece is {piece!r}")
        pos += n
        return text, tuple(token_ids[pos - n : pos])

    system_text, root_ids = take(state["system"]) if state["system"] is not None else (None, ())
    _require(system_text is None or (system_text and root_ids), "the system prompt is empty")
    segments = tuple(Segment(*take(piece)) for piece in state["segments"])
    _require(pos == len(token_ids), f"its pieces hold {pos} tokens, the file {len(token_ids)}")
    return SavedChat(session_id, config, messages, system_text, root_ids, segments, turns)


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)
