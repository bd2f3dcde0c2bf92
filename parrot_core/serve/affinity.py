"""Prefix affinity for work the serve layer does not hold as cached contexts (plain generate
requests, OpenAI requests): which engines recently ran a prompt that starts like this one.

Engines keep their own prefix caches (the builtin engine's block hashes, vLLM's automatic
prefix caching, a remote server's cache), which the serve layer cannot see. So it remembers
what it sent where: a prompt is cut into chunks of `chunk_tokens`; the key of chunk i chains
the key of chunk i-1 with the chunk's tokens (like a block hash) and maps to the engines that
ran a prompt with that prefix. A prompt's affinity to an engine is how many of its leading
tokens, in whole chunks, that engine ran. It is an estimate (the engine may have evicted them
since) that only prefers one engine over another; correctness never depends on it. Bounded:
the least recently used keys are forgotten first.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import xxhash

DEFAULT_CHUNK_TOKENS = 64
DEFAULT_MAX_KEYS = 1 << 16


class PrefixAffinity:
    def __init__(self, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.chunk_tokens = chunk_tokens
        self.max_keys = max_keys
        self._engines: OrderedDict[int, set[Hashable]] = OrderedDict()  # chunk key -> engines, least recent first

    def keys(self, token_ids: Sequence[int]) -> list[int]:
        """The chained keys of the prompt's whole chunks (a partial last chunk has none)."""
        keys: list[int] = []
        key = 0
        c = self.chunk_tokens
        for start in range(0, len(token_ids) - c + 1, c):
            key = xxhash.xxh3_64_intdigest(array("q", token_ids[start : start + c]).tobytes(), seed=key)
            keys.append(key)
        return keys

    def record(self, engine_id: Hashable, keys: Sequence[int]) -> None:
        """`engine_id` ran a prompt with these chunk keys."""
        for key in keys:
            engines = self._engines.get(key)
            if engines is None:
                self._engines[key] = {engine_id}
            else:
                engines.add(engine_id)
                self._engines.move_to_end(key)
        while len(self._engines) > self.max_keys:
            self._engines.popitem(last=False)

    def match(self, keys: Sequence[int]) -> dict[Hashable, int]:
        """For each engine that ran a prefix of these keys: how many leading tokens it ran."""
        tokens: dict[Hashable, int] = {}
        for i, key in enumerate(keys):
            engines = self._engines.get(key)
            if not engines:
                break
            longer = False
            for engine_id in engines:
                if tokens.get(engine_id, 0) == i * self.chunk_tokens:
                    tokens[engine_id] = (i + 1) * self.chunk_tokens
                    longer = True
            if not longer:
                break
        return tokens

    def forget_engine(self, engine_id: Hashable) -> None:
        for key in [k for k, engines in self._engines.items() if engine_id in engines]:
            engines = self._engines[key]
            engines.discard(engine_id)
            if not engines:
                del self._engines[key]

    def __len__(self) -> int:
        return len(self._engines)
