"""Contexts saved to disk (issue 12, part 3), engine side: `export_context` /
`import_context` of the builtin engine and the safetensors format of `kv_io`, on tiny seeded
float64 Llamas. Exactness: a context exported and imported (into any block size) continues
with the same greedy ids as the original, computing no prompt token."""

from __future__ import annotations

import asyncio
import random
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

from parrot_core.engines.base import SamplingParams
from parrot_core.engines.builtin import kv_io
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.engines.builtin.kv_contexts import ContextExistsError
from parrot_core.engines.builtin.kv_io import ContextFileError, ContextKV
from parrot_core.errors import InvalidRequestError, OutOfBlocksError, RequestTooLargeError, UnknownContextError

pytestmark = pytest.mark.timeout(120)
GREEDY = dict(temperature=0.0, ignore_eos=True)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 101) for _ in range(n)]


@pytest.fixture
def make_engine(tiny_llama):
    """Engines over tiny float64 Llamas. Teardown: the test freed every context it made, the
    tables and refcounts are consistent and no block is used."""
    engines: list[BuiltinEngine] = []

    def make(seed: int = 0, dtype: torch.dtype = torch.float64, **config) -> BuiltinEngine:
        config = {"block_size": 4, "num_kv_blocks": 64, "dtype": dtype, **config}
        engine = BuiltinEngine(tiny_llama(seed=seed, dtype=dtype), None, EngineConfig(**config))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.wait_idle()
        engine.check_invariants()
        info = engine.runtime_info()
        assert info.num_contexts == 0 and info.num_blocks_used == 0, info
        engine.close()


async def generate(engine: BuiltinEngine, cid: int, n: int) -> list[int]:
    out: list[int] = []
    async for delta in engine.generate(cid, None, SamplingParams(max_tokens=n, **GREEDY)):
        out.extend(delta.token_ids)
    return out


def free(engine: BuiltinEngine, *cids: int) -> None:
    for cid in cids:
        engine.free_context(cid)
    engine.wait_idle()


def test_exported_context_continues_exactly_in_another_block_size_computing_nothing(make_engine, tmp_path):
    a, b = make_engine(block_size=4), make_engine(block_size=8)

    async def main() -> None:
        await a.fill(1, None, prompt(1, 13))
        await a.fill(2, 1, prompt(2, 6))  # a fork: the export holds its ancestors' tokens too
        first = await generate(a, 2, 5)
        kv = await a.export_context(2)
        assert kv.token_ids == prompt(1, 13) + prompt(2, 6) + first
        assert kv.k.shape == (2, 24, 2, 16) and kv.last_hidden is not None
        reference = await generate(a, 2, 9)  # never saved: the original continues

        path = tmp_path / "ctx.safetensors"
        kv_io.write_context_file(path, kv, a.kv_spec)
        computed = b.stats["prompt_tokens_computed"]
        await b.import_context(7, kv_io.read_context_file(path, b.kv_spec))
        b.check_invariants()
        assert await generate(b, 7, 9) == reference
        assert b.stats["prompt_tokens_computed"] == computed  # not one prompt token computed
        assert b.stats["restored_tokens"] == 24

    asyncio.run(main())
    free(a, 2, 1)
    free(b, 7)


def test_export_recomputes_evicted_kv_and_a_missing_hidden_state(make_engine):
    """Recomputed KV may differ from the first computation in the last bits (another attention
    path: cached blocks are re-hit), never in what it generates."""
    engine, loader = make_engine(), make_engine(block_size=8)
    tokens = prompt(3, 14)

    def close(a: ContextKV, b: ContextKV) -> bool:
        return a.token_ids == b.token_ids and all(
            torch.allclose(x, y, rtol=0, atol=1e-12) for x, y in ((a.k, b.k), (a.v, b.v), (a.last_hidden, b.last_hidden))
        )

    async def continuation(kv: ContextKV, cid: int) -> list[int]:
        await loader.import_context(cid, kv)
        return await generate(loader, cid, 8)

    async def main() -> None:
        await engine.fill(1, None, tokens)
        kept = await engine.export_context(1)
        engine.call(lambda: engine.tree.release(engine.tree.get(1)))  # evicted: tokens only
        assert engine.call(lambda: engine.tree.get(1).num_computed) == 0
        recomputed = await engine.export_context(1)
        assert close(recomputed, kept)
        assert await continuation(recomputed, 1) == await continuation(kept, 2) == await generate(engine, 1, 8)

        await engine.split(2, 1, 11)  # the first 11 of its 22 tokens: computed KV, no hidden state
        assert engine.call(lambda: engine.tree.get(2).last_hidden) is None
        carved = await engine.export_context(2)
        assert carved.token_ids == tokens[:-3] and carved.last_hidden is not None
        await engine.fill(3, None, tokens[:-3])
        fresh = await engine.export_context(3)
        assert close(carved, fresh)
        assert await continuation(carved, 3) == await continuation(fresh, 4) == await generate(engine, 3, 8)

    asyncio.run(main())
    free(engine, 3, 2, 1)
    free(loader, 1, 2, 3, 4)


def test_export_refuses_unknown_empty_and_busy_contexts(make_engine):
    engine = make_engine()
    gate = threading.Event()

    async def main() -> None:
        with pytest.raises(UnknownContextError):
            await engine.export_context(99)
        await engine.fill(1, None, [])  # an empty context
        with pytest.raises(InvalidRequestError, match="empty"):
            await engine.export_context(1)
        await engine.fill(2, None, prompt(4, 6))
        stream = engine.generate(2, None, SamplingParams(max_tokens=200, **GREEDY))
        await stream.__anext__()  # it runs
        engine._post(lambda: gate.wait(30))  # hold the engine thread so the generation cannot end
        export = asyncio.ensure_future(engine.export_context(2))
        await asyncio.sleep(0.05)
        gate.set()
        with pytest.raises(InvalidRequestError, match="busy"):
            await export
        await stream.aclose()

    asyncio.run(main())
    free(engine, 2, 1)
    assert engine.call(lambda: engine.tree.contexts()) == []


def test_import_is_atomic(make_engine):
    engine = make_engine(num_kv_blocks=8)
    other = make_engine()
    gate = threading.Event()

    async def main() -> None:
        await other.fill(1, None, prompt(5, 14))
        kv = await other.export_context(1)
        await engine.import_context(1, kv)
        with pytest.raises(ContextExistsError):
            await engine.import_context(1, kv)
        bad_shape = ContextKV(kv.token_ids, kv.k[:, :-1], kv.v[:, :-1], kv.last_hidden)
        bad_ids = ContextKV([500] + kv.token_ids[1:], kv.k, kv.v, kv.last_hidden)
        for bad in (bad_shape, bad_ids):
            with pytest.raises(InvalidRequestError):
                await engine.import_context(2, bad)
        long = ContextKV(kv.token_ids * 3, kv.k.repeat(1, 3, 1, 1), kv.v.repeat(1, 3, 1, 1), kv.last_hidden)
        with pytest.raises(RequestTooLargeError):  # 42 tokens never fit 8 blocks of 4
            await engine.import_context(2, long)
        free(engine, 1)

        # No room even after evicting idle contexts: a running generation holds the blocks.
        await engine.fill(3, None, prompt(6, 21))
        stream = engine.generate(3, None, SamplingParams(max_tokens=8, **GREEDY))
        await stream.__anext__()
        engine._post(lambda: gate.wait(30))
        before = asyncio.ensure_future(engine._on_thread(lambda: engine.pool.free_queue()))
        attempt = asyncio.ensure_future(engine.import_context(4, kv))
        after = asyncio.ensure_future(engine._on_thread(lambda: (engine.pool.free_queue(), 4 in engine.tree)))
        await asyncio.sleep(0.05)
        gate.set()
        with pytest.raises(OutOfBlocksError):
            await attempt
        assert (await after) == (await before, False)  # the pool is exactly as it was
        async for _ in stream:
            pass

    asyncio.run(main())
    free(engine, 3)
    free(other, 1)


def test_import_shares_cached_blocks_and_registers_its_own(make_engine):
    source, engine = make_engine(), make_engine()
    tokens = prompt(7, 18)  # 4 full blocks of 4 and 2 tokens

    async def main() -> None:
        await source.fill(1, None, tokens)
        kv = await source.export_context(1)
        await engine.import_context(1, kv)
        used = engine.runtime_info().num_blocks_used
        await engine.import_context(2, kv)  # the same tokens again: their full blocks are shared
        assert engine.runtime_info().num_blocks_used == used + 1
        fill = await engine.fill(3, None, tokens + prompt(8, 3))  # registered like computed blocks
        assert fill.cached_tokens == 16

    asyncio.run(main())
    free(engine, 3, 2, 1)
    free(source, 1)


# -- the file -----------------------------------------------------------------------------------
@pytest.fixture
def saved(make_engine, tmp_path):
    """(engine, path of a context of 11 tokens it saved)."""
    engine = make_engine()

    async def export() -> ContextKV:
        await engine.fill(1, None, prompt(9, 11))
        return await engine.export_context(1)

    path = tmp_path / "ctx.safetensors"
    kv_io.write_context_file(path, asyncio.run(export()), engine.kv_spec)
    free(engine, 1)
    return engine, path


def test_the_file_round_trips_and_names_the_model(saved):
    engine, path = saved
    kv = kv_io.read_context_file(path, engine.kv_spec)
    assert kv.token_ids == prompt(9, 11) and kv.k.dtype == torch.float64 and kv.k.shape == (2, 11, 2, 16)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == kv_io.FORMAT and meta["format_version"] == "1" and meta["dtype"] == "float64"
    assert meta["model_fingerprint"] == engine.kv_spec.fingerprint and meta["block_size"] == "4"
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was renamed, not left behind


def test_the_fingerprint_is_stable_per_model_and_differs_across_models(tiny_llama):
    same = kv_io.model_fingerprint(tiny_llama(seed=0)), kv_io.model_fingerprint(tiny_llama(seed=0))
    assert same[0] == same[1] and len(same[0]) == 64
    assert kv_io.model_fingerprint(tiny_llama(seed=1)) != same[0]
    assert kv_io.model_fingerprint(tiny_llama(seed=0, dtype=torch.float32)) != same[0]
    assert kv_io.model_fingerprint(tiny_llama(seed=0, rms_norm_eps=1e-5)) != same[0]  # the config counts


def test_another_model_or_dtype_is_refused(saved, make_engine):
    _, path = saved
    with pytest.raises(ContextFileError, match="another model"):
        kv_io.read_context_file(path, make_engine(seed=1).kv_spec)
    with pytest.raises(ContextFileError, match="float64 KV; this engine's KV is float32"):
        kv_io.read_context_file(path, make_engine(dtype=torch.float32).kv_spec)
    kv_io.read_context_file(path, make_engine(block_size=16).kv_spec)  # another block size is fine


def _header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: b"", "not a readable safetensors file"),
        (lambda d: d[:5], "not a readable safetensors file"),
        (lambda d: d[: _header_len(d) // 2], "not a readable safetensors file"),
        (lambda d: d[: _header_len(d) + 100], "not a readable safetensors file"),
        (lambda d: d[:-1], "not a readable safetensors file"),
        (lambda d: bytes(random.Random(0).randrange(256) for _ in range(len(d))), "not a readable safetensors file"),
        (lambda d: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + d[24:], "not a readable safetensors file"),
        (lambda d: d[:-3] + bytes([d[-3] ^ 1]) + d[-2:], "checksum"),
    ],
    ids=["empty", "5 bytes", "half header", "cut in the data", "last byte gone", "garbage", "bad header", "flipped bit"],
)
def test_a_damaged_file_is_refused(saved, damage, message):
    engine, path = saved
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ContextFileError, match=message):
        kv_io.read_context_file(path, engine.kv_spec)


def test_another_format_or_version_or_no_file_is_refused(saved, tmp_path):
    engine, path = saved
    kv = kv_io.read_context_file(path, engine.kv_spec)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(plain), metadata={"format": "pt"})
    with pytest.raises(ContextFileError, match="not a saved parrot-core context"):
        kv_io.read_context_file(plain, engine.kv_spec)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = {"token_ids": torch.tensor(kv.token_ids), "k": kv.k, "v": kv.v, "last_hidden": kv.last_hidden}
    save_file(tensors, str(plain), metadata={**meta, "format_version": "2"})
    with pytest.raises(ContextFileError, match="format version '2'; this parrot-core reads version 1"):
        kv_io.read_context_file(plain, engine.kv_spec)
    save_file({**tensors, "k": kv.k[:, :5].contiguous()}, str(plain), metadata=meta)
    with pytest.raises(ContextFileError, match="damaged: k is"):
        kv_io.read_context_file(plain, engine.kv_spec)
    with pytest.raises(ContextFileError, match="not a file"):
        kv_io.read_context_file(tmp_path / "missing.safetensors", engine.kv_spec)
    with pytest.raises(ContextFileError, match="cannot write"):
        kv_io.write_context_file(tmp_path / "no" / "such" / "dir.safetensors", kv, engine.kv_spec)
