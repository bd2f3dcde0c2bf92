"""Real text that ships with Python: the documentation strings of a few standard modules."""

from __future__ import annotations

import argparse
import json


def document() -> str:
    """The argparse and json module documentation, as plain prose-and-code text."""
    return argparse.__doc__.strip() + "\n\n" + json.__doc__.strip()


def chunks(words_per_chunk: int = 120, limit: int | None = None) -> list[str]:
    words = document().split()
    parts = [" ".join(words[i : i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)]
    return parts[:limit] if limit else parts
