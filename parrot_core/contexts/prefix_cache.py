"""One engine's prefix cache: keys of consecutive-Fill prefixes -> the context holding them.

A key names a *sequence of semantic-variable ids*: key(i) = xxh3_128(key(i-1), hash(var_i)).
Each entry also stores its parent key and variable id, and `get` checks both, so a hash
collision is a miss, never a wrong context (by induction the whole id sequence is verified).
The reverse map is context id -> set of keys; when a context dies, all its keys go.
The cache holds no reference on the contexts it names: an entry lives exactly as long as its
context (the manager calls `remove_context` when the context dies).
"""

from __future__ import annotations

from typing import NamedTuple

import xxhash

from parrot_core.errors import InvariantError

ROOT_KEY = ""


def hash_var_id(var_id: str) -> str:
    return xxhash.xxh3_128_hexdigest(var_id.encode("utf-8"))


def child_key(parent_key: str, var_id: str) -> str:
    return xxhash.xxh3_128_hexdigest(f"{parent_key}/{hash_var_id(var_id)}".encode())


class _Entry(NamedTuple):
    context_id: int
    parent_key: str
    var_id: str


class PrefixCache:
    def __init__(self) -> None:
        self._forward: dict[str, _Entry] = {}
        self._reverse: dict[int, set[str]] = {}

    def __len__(self) -> int:
        return len(self._forward)

    def get(self, key: str, parent_key: str, var_id: str) -> int | None:
        entry = self._forward.get(key)
        if entry is None or entry.parent_key != parent_key or entry.var_id != var_id:
            return None
        return entry.context_id

    def put(self, key: str, context_id: int, parent_key: str, var_id: str) -> bool:
        """Cache `context_id` under `key`. Returns False (and changes nothing) if the key is
        taken, which happens only for an in-flight duplicate or a hash collision."""
        if key in self._forward:
            return False
        self._forward[key] = _Entry(context_id, parent_key, var_id)
        self._reverse.setdefault(context_id, set()).add(key)
        return True

    def remove_key(self, key: str) -> None:
        entry = self._forward.pop(key, None)
        if entry is not None:
            keys = self._reverse[entry.context_id]
            keys.discard(key)
            if not keys:
                del self._reverse[entry.context_id]

    def remove_context(self, context_id: int) -> set[str]:
        keys = self._reverse.pop(context_id, set())
        for key in keys:
            del self._forward[key]
        return keys

    def parent_key(self, key: str) -> str:
        return self._forward[key].parent_key if key in self._forward else ROOT_KEY

    def var_id(self, key: str) -> str:
        return self._forward[key].var_id if key in self._forward else ""

    def keys_of(self, context_id: int) -> set[str]:
        return set(self._reverse.get(context_id, ()))

    def items(self) -> list[tuple[str, int]]:
        return [(key, entry.context_id) for key, entry in self._forward.items()]

    def check_consistent(self) -> None:
        """Forward and reverse maps describe the same pairs."""
        pairs = {(k, e.context_id) for k, e in self._forward.items()}
        reverse_pairs = {(k, cid) for cid, keys in self._reverse.items() for k in keys}
        if pairs != reverse_pairs or any(not keys for keys in self._reverse.values()):
            raise InvariantError(f"prefix cache maps disagree: {pairs ^ reverse_pairs}")
