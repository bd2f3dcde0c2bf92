"""A conversation as the tokens its context holds: segments of (text, token ids).

A chat session's context holds exactly the concatenation of its segments' token ids, and the
concatenation of their texts is the rendered conversation those tokens stand for. Two kinds of
segment alternate: a *prompt* segment (rendered template text the session tokenized itself:
the system prompt, then each turn's delta such as `<|im_end|>\\n<|im_start|>user\\n...`) and a
*reply* segment (the token ids the model generated, never re-tokenized; its text is their
exact decoding, special tokens included).

Matching a newly rendered conversation against the segments is exact at the token level: a
segment whose text the new rendering still holds at the same place keeps its tokens; at the
first one that differs, the rest of the rendering is tokenized and only the tokens it shares
with that segment are kept. So the tokens kept are always a prefix of the new conversation's
tokens, and nothing whose text changed is ever reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Encode = Callable[[str, bool], list[int]]  # (text, starts_sequence) -> token ids


@dataclass(frozen=True)
class Segment:
    """A piece of the conversation: `token_ids` is what the context holds for `text`."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Match:
    """How a rendered conversation extends the cached segments.

    `segments`: the new conversation's segments (the cached ones it keeps, then one segment
    for the rest of the rendering); `reused`: how many of the cached segments' tokens are a
    prefix of the new tokens; `new_ids`: the tokens after those, to compute."""

    segments: tuple[Segment, ...]
    reused: int
    new_ids: list[int]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def match_segments(segments: Sequence[Segment], text: str, start: int, encode: Encode) -> Match:
    """Match `text[start:]` against `segments` (which stand for text starting at `start`).
    `encode(piece, starts_sequence)` tokenizes a piece; `starts_sequence` is true for a piece
    at offset 0 of the whole sequence (it may get the model's BOS)."""
    kept: list[Segment] = []
    reused, pos = 0, start
    for seg in segments:
        if text.startswith(seg.text, pos):
            kept.append(seg)
            reused += len(seg.token_ids)
            pos += len(seg.text)
            continue
        tail = encode(text[pos:], pos == 0)
        common = common_prefix_len(seg.token_ids, tail)
        return Match((*kept, Segment(text[pos:], tuple(tail))), reused + common, tail[common:])
    rest = text[pos:]
    if not rest:
        return Match(tuple(kept), reused, [])
    tail = encode(rest, pos == 0)
    return Match((*kept, Segment(rest, tuple(tail))), reused, tail)


def token_ids_of(segments: Sequence[Segment]) -> list[int]:
    return [t for seg in segments for t in seg.token_ids]
