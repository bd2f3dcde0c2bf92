"""Contexts saved to disk and restored (issue 12, part 3; llama.cpp's slot save/restore):
save, close the runtime, restore in a new runtime (another block size too), continue: the same
greedy ids as never saving, and no prompt token computed for the restored part. Another model
or a damaged file is a typed error that changes nothing."""

from __future__ import annotations

import random

import pytest
import torch

from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.engines.builtin.kv_io import ContextFileError
from parrot_core.errors import InvalidRequestError, UnknownContextError
from tests.frontend.conftest import assert_no_leak

pytestmark = pytest.mark.timeout(300)
GREEDY = dict(temperature=0.0, ignore_eos=True)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 101) for _ in range(n)]


@pytest.fixture
def runtimes():
    """Make runtimes; `done(rt)` runs the invariant and leak checks, then closes. Teardown:
    every runtime made was checked that way."""
    made: list[Runtime] = []
    checked: list[Runtime] = []

    def done(rt: Runtime) -> None:
        assert_no_leak(rt)
        rt.close()
        checked.append(rt)

    yield made, done
    unchecked = [rt for rt in made if rt not in checked]
    for rt in unchecked:
        rt.close()
    assert not unchecked, "a runtime was closed without its leak check"


@pytest.fixture
def tiny(tiny_llama, runtimes):
    made, done = runtimes

    def make(block_size: int = 4, seed: int = 0, num_kv_blocks: int = 64) -> Runtime:
        config = EngineConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, dtype=torch.float64)
        rt = Runtime(engine=BuiltinEngine(tiny_llama(seed=seed), None, config))
        made.append(rt)
        return rt

    return make, done


def computed(rt: Runtime) -> int:
    return rt.stats()["prompt_tokens_computed"]


@pytest.mark.parametrize("block_size", [4, 8, 3])
def test_save_close_restore_in_a_new_runtime_and_continue_exactly(tiny, tmp_path, block_size):
    make, done = tiny
    path = tmp_path / "ctx.safetensors"
    a = make(block_size=4)
    root = a.new_context()
    root.fill(ids(1, 10))
    child = root.fork()
    child.fill(ids(2, 5))
    first = child.generate(max_tokens=4, **GREEDY)  # the context holds generated tokens too
    assert child.save(path) == 19  # its whole sequence: the parent's tokens included
    reference = child.generate(max_tokens=12, **GREEDY)  # never saved: the original goes on
    child.free()
    root.free()
    done(a)

    b = make(block_size=block_size)
    before = computed(b)
    restored = b.load_context(path)
    assert restored.tokens_num == 19 and restored.context.parent_context is None
    out = restored.generate(max_tokens=12, **GREEDY)
    assert out.token_ids == reference.token_ids
    assert computed(b) == before  # not one prompt token computed for the restored part
    assert b.engine.stats["restored_tokens"] == 19
    b.check_invariants()
    # and it equals a fresh run of the same tokens in the new runtime
    fresh = b.generate(ids(1, 10) + ids(2, 5) + first.token_ids, max_tokens=12, **GREEDY)
    assert fresh.token_ids == reference.token_ids
    restored.free()
    done(b)


def test_saving_leaves_the_context_as_it_was_and_works_after_eviction(tiny, tmp_path):
    make, done = tiny
    a = make(num_kv_blocks=12)  # 48 slots: the big generation below evicts the held context
    held = a.new_context()
    held.fill(ids(3, 17))
    a.generate(ids(4, 20), max_tokens=20, **GREEDY)
    assert a.engine.stats["evicted_blocks"] > 0
    assert a.engine.call(lambda: a.engine.tree.get(held.context_id).num_computed) == 0  # evicted
    assert held.save(tmp_path / "evicted.safetensors") == 17  # recomputed, then saved
    reference = held.generate(max_tokens=8, **GREEDY)
    held.free()
    done(a)

    b = make(block_size=8)
    with b.load_context(tmp_path / "evicted.safetensors") as restored:
        before = computed(b)
        assert restored.generate(max_tokens=8, **GREEDY).token_ids == reference.token_ids
        assert computed(b) == before
    done(b)


def test_a_restored_context_is_in_the_prefix_cache_and_forks(tiny, tmp_path):
    make, done = tiny
    a = make()
    with a.new_context() as h:
        h.fill(ids(5, 18))
        h.save(tmp_path / "ctx.safetensors")
    done(a)

    b = make(block_size=4)
    restored = b.load_context(tmp_path / "ctx.safetensors")
    fork = restored.fork()
    fork.fill(ids(6, 3))
    forked = fork.generate(max_tokens=5, **GREEDY)
    fork.free()
    restored.free()
    out = b.generate(ids(5, 18) + ids(6, 3), max_tokens=5, **GREEDY)
    assert out.cached_tokens == 20 and out.token_ids == forked.token_ids  # its full blocks were registered
    done(b)


def test_another_model_or_a_damaged_file_is_a_typed_error_that_changes_nothing(tiny, tmp_path):
    make, done = tiny
    a = make()
    with a.new_context() as h:
        h.fill(ids(7, 14))
        h.save(tmp_path / "ctx.safetensors")
    done(a)
    data = (tmp_path / "ctx.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 100])
    (tmp_path / "garbage.safetensors").write_bytes(bytes(random.Random(1).randrange(256) for _ in range(4096)))

    other = make(seed=1)  # another model of the same shape
    held = other.new_context()
    held.fill(ids(8, 9))
    other.generate(ids(9, 9), max_tokens=3, **GREEDY)  # leaves cached blocks
    other.engine.wait_idle()
    state = other.stats(), other.engine.call(lambda: other.engine.pool.free_queue())
    cases = [
        ("ctx.safetensors", "another model"),
        ("truncated.safetensors", "not a readable safetensors file"),
        ("garbage.safetensors", "not a readable safetensors file"),
        ("missing.safetensors", "not a file"),
    ]
    for name, message in cases:
        with pytest.raises(ContextFileError, match=message) as error:
            other.load_context(tmp_path / name)
        assert isinstance(error.value, InvalidRequestError)
        other.engine.wait_idle()
        assert (other.stats(), other.engine.call(lambda: other.engine.pool.free_queue())) == state
        other.check_invariants()
    assert len(held.generate(max_tokens=3, **GREEDY).token_ids) == 3  # it still works
    held.free()
    done(other)


def test_saving_a_dead_context_or_to_a_bad_path_is_refused(tiny, tmp_path):
    make, done = tiny
    rt = make()
    h = rt.new_context()
    h.fill(ids(10, 5))
    with pytest.raises(ContextFileError, match="cannot write"):
        h.save(tmp_path / "no" / "dir" / "ctx.safetensors")
    h.free()
    with pytest.raises(UnknownContextError):
        h.save(tmp_path / "ctx.safetensors")
    with rt.new_context() as empty, pytest.raises(InvalidRequestError, match="empty"):
        empty.save(tmp_path / "ctx.safetensors")
    assert not list(tmp_path.iterdir())
    done(rt)


def test_the_real_model_restores_exactly_in_a_new_runtime(real_model, real_llama, runtimes, tmp_path):
    made, done = runtimes

    def make(block_size: int) -> Runtime:
        config = EngineConfig(block_size=block_size, num_kv_blocks=64)
        rt = Runtime(engine=BuiltinEngine(real_llama, real_model.tokenizer, config, real_model.model_name))
        made.append(rt)
        return rt

    a = make(16)
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Name three colours."}]
    h = a.new_context()
    h.fill(a.apply_chat_template(messages))
    first = h.generate(max_tokens=6, temperature=0.0)
    n = h.save(tmp_path / "chat.safetensors")
    reference = h.generate(max_tokens=16, temperature=0.0, ignore_eos=True)
    h.free()
    done(a)

    b = make(32)
    before = computed(b)
    with b.load_context(tmp_path / "chat.safetensors") as restored:
        assert restored.tokens_num == n and len(first.token_ids) == 6
        out = restored.generate(max_tokens=16, temperature=0.0, ignore_eos=True)
        assert out.token_ids == reference.token_ids and out.text == reference.text
        assert computed(b) == before
    done(b)

    # The fingerprint is the file's, not the load's: a second load of the model accepts it.
    from parrot_core.engines.builtin.default_model import default_model_path
    from parrot_core.engines.builtin.gguf_loader import load_gguf
    from parrot_core.engines.builtin.kv_io import model_fingerprint
    from parrot_core.engines.builtin.model import LlamaModel

    again = load_gguf(default_model_path())
    assert model_fingerprint(LlamaModel(again.config, again.weights)) == b.engine.kv_spec.fingerprint
