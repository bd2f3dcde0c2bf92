"""The program API over HTTP: a real uvicorn server on 127.0.0.1 and `P.connect`."""

from __future__ import annotations

import httpx
import pytest

import parrot_core as P
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.errors import InvalidRequestError, UnknownVariableError
from parrot_core.frontend.remote import RemoteVariable, connect
from parrot_core.server.app import create_app
from parrot_core.server.server import Server
from parrot_core.server.settings import ServeSettings

from .conftest import RecordingEngine
from .functions import write_code, write_tests

pytestmark = pytest.mark.timeout(120)


@P.native_function()
def shout(text: P.Input, loud: P.Output):
    loud.set(text.get().upper())


def program(rt) -> tuple[str, str, str]:
    task = rt.variable("task", "a snake game")
    code = write_code.invoke(rt, task)
    loud = shout.invoke(rt, code)
    tests = write_tests.invoke(rt, task, loud)
    return code.get(), loud.get(), tests.get(P.LATENCY)


@pytest.fixture
def server(tiny_text_llama, real_model):
    engine = RecordingEngine(tiny_text_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=256), "tiny")
    rt = P.Runtime(engine=engine)
    settings = ServeSettings(port=0, log_stats_interval=0)
    srv = Server(create_app(rt, settings), settings, log_level="warning").start_in_thread()
    yield srv, rt
    srv.stop_thread()
    rt.check_invariants()
    assert [c for c in rt.contexts.contexts.values() if not c.pinned] == []  # sessions freed their KV
    rt.close()


def test_the_same_program_remote_and_in_process_gives_the_same_greedy_output(server, tiny_text_llama, real_model):
    srv, _ = server
    with connect(srv.url) as remote:
        remote_result = program(remote)
    local_engine = RecordingEngine(tiny_text_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=256), "tiny")
    with P.Runtime(engine=local_engine) as local:
        local_result = program(local)
    assert remote_result == local_result
    assert remote_result[1] == remote_result[0].upper()  # the native function ran client-side


def test_session_token_is_enforced_and_sessions_cannot_read_each_other(server):
    srv, _ = server
    with connect(srv.url) as a, connect(srv.url) as b:
        secret = a.variable("secret", "only for a")
        assert secret.get() == "only for a"
        # b names a's variable: unknown in b's session
        with pytest.raises(UnknownVariableError):
            RemoteVariable(b, secret.var_id).get(timeout=2)
        # a's session with b's token (or none): 401
        raw = httpx.get(f"{srv.url}/v1/semantic_var/{secret.var_id}", params={"session_id": a.session_id}, headers={"X-Session-Token": "forged"})
        assert raw.status_code == 401 and raw.json()["error"]["message"]
        raw = httpx.get(f"{srv.url}/v1/semantic_var/{secret.var_id}", params={"session_id": a.session_id})
        assert raw.status_code == 401


def test_errors_over_the_wire_are_typed(server):
    srv, _ = server
    with connect(srv.url) as rt:
        with pytest.raises(InvalidRequestError, match="no parameter"):
            rt.submit_call("Hi {{x}} {{out}}", [P.graph.Parameter("out", is_output=True)], {}, P.graph.RequestMetadata())
        v = rt.variable("v", "set once")
        with pytest.raises(InvalidRequestError, match="already set"):
            v.set("twice")
        # a failing native function fails its output and the downstream call
        @P.native_function()
        def broken(text: P.Input, out: P.Output):
            raise ValueError("client-side failure")

        bad = write_code.invoke(rt, broken.invoke(rt, "x"))
        with pytest.raises(P.errors.ParrotError, match="client-side failure"):
            bad.get(timeout=30)
        assert write_code.invoke(rt, "a clock").get(timeout=30)  # the session still works
