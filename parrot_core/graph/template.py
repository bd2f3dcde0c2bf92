"""Splitting a prompt template into text and `{{name}}` placeholder chunks."""

from __future__ import annotations

import re
from dataclasses import dataclass

from parrot_core.errors import TemplateError

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class TextChunk:
    text: str


@dataclass(frozen=True)
class PlaceholderChunk:
    name: str


Chunk = TextChunk | PlaceholderChunk


def parse_template(template: str) -> list[Chunk]:
    """Split `template` into chunks, in order. Empty text between placeholders is dropped.

    Raises `TemplateError` for a placeholder that is not an identifier (`{{ 1x }}`) and for a
    stray `{{` or `}}` outside a placeholder, naming the position.
    """
    if not isinstance(template, str):
        raise TemplateError(f"a template must be a string, got {type(template).__name__}")
    chunks: list[Chunk] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(template):
        _add_text(chunks, template[pos : match.start()], pos)
        name = match.group(1).strip()
        if not _IDENTIFIER.fullmatch(name):
            raise TemplateError(f"placeholder {match.group(0)!r} at offset {match.start()} is not an identifier")
        chunks.append(PlaceholderChunk(name))
        pos = match.end()
    _add_text(chunks, template[pos:], pos)
    return chunks


def _add_text(chunks: list[Chunk], text: str, offset: int) -> None:
    for token in ("{{", "}}"):
        at = text.find(token)
        if at >= 0:
            raise TemplateError(f"unmatched {token!r} at offset {offset + at} of the template")
    if text:
        chunks.append(TextChunk(text))
