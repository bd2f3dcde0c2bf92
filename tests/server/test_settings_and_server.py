"""`ServeSettings` (defaults < env < flags), the generated `parrot-core serve` command, and
`Server.run(load=...)`: bound before the model is loaded, `/health` 503 until it is."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import torch
from typer.testing import CliRunner

from parrot_core.cli import app as cli_app
from parrot_core.errors import InvalidRequestError
from parrot_core.server import server as server_module
from parrot_core.server.app import create_app
from parrot_core.server.server import Server
from parrot_core.server.settings import ServeSettings
from tests.server.conftest import wait_for


def test_defaults_follow_vllm_names():
    s = ServeSettings()
    assert (s.host, s.port, s.block_size, s.enable_prefix_caching, s.api_key) == ("127.0.0.1", 8000, 16, True, None)
    config = s.replace(max_model_len=512, num_kv_blocks=10).engine_config()
    assert config.max_model_len == 512 and config.num_kv_blocks == 10 and config.enable_prefix_caching
    assert s.dtype == "auto" and config.dtype == torch.float32
    assert s.replace(dtype="bfloat16").engine_config().dtype == torch.bfloat16
    assert s.replace(dtype="half").engine_config().dtype == torch.float16
    with pytest.raises(InvalidRequestError, match="dtype must be one of"):
        ServeSettings(dtype="int3")


def test_env_then_overrides():
    env = {
        "PARROT_CORE_PORT": "9001",
        "PARROT_CORE_ENABLE_PREFIX_CACHING": "false",
        "PARROT_CORE_NUM_KV_BLOCKS": "",
        "PARROT_CORE_API_KEY": "k",
        "PARROT_CORE_LOG_STATS_INTERVAL": "2.5",
        "UNRELATED": "x",
    }
    s = ServeSettings.from_env(env, port=9002)
    assert s.port == 9002 and s.enable_prefix_caching is False and s.num_kv_blocks is None
    assert s.api_key == "k" and s.log_stats_interval == 2.5
    with pytest.raises(InvalidRequestError, match="PARROT_CORE_PORT"):
        ServeSettings.from_env({"PARROT_CORE_PORT": "eighty"})
    with pytest.raises(InvalidRequestError, match="block_size"):
        ServeSettings(block_size=0)
    with pytest.raises(InvalidRequestError, match="unknown settings"):
        ServeSettings.from_env({}, gpu_memory_utilization=0.9)
    s = ServeSettings.from_env({"PARROT_CORE_MAX_REQUEST_BODY_BYTES": "1000", "PARROT_CORE_SHUTDOWN_GRACE_SECONDS": "2.5"})
    assert s.max_request_body_bytes == 1000 and s.shutdown_grace_seconds == 2.5
    assert ServeSettings().max_request_body_bytes == 8 * 1024 * 1024 and ServeSettings().shutdown_grace_seconds == 30
    with pytest.raises(InvalidRequestError, match="max_request_body_bytes"):
        ServeSettings(max_request_body_bytes=0)
    with pytest.raises(InvalidRequestError, match="shutdown_grace_seconds"):
        ServeSettings(shutdown_grace_seconds=-1)


def test_cli_flags_beat_env(monkeypatch):
    got: list[ServeSettings] = []
    monkeypatch.setattr(server_module, "serve", got.append)
    monkeypatch.setenv("PARROT_CORE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("PARROT_CORE_API_KEY", "from-env")
    args = ["serve", "model.gguf", "--port", "9", "--no-enable-prefix-caching", "--max-num-seqs", "3",
            "--max-model-len", "1024", "--served-model-name", "m", "--block-size", "32", "--num-kv-blocks", "100",
            "--max-num-batched-tokens", "512", "--host", "127.0.0.1", "--max-request-body-bytes", "4096",
            "--shutdown-grace-seconds", "5", "--dtype", "bfloat16"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    (s,) = got
    assert s.model == "model.gguf" and s.port == 9 and s.enable_prefix_caching is False
    assert s.max_num_seqs == 3 and s.api_key == "from-env" and s.max_model_len == 1024
    assert (s.served_model_name, s.block_size, s.num_kv_blocks, s.max_num_batched_tokens) == ("m", 32, 100, 512)
    assert (s.max_request_body_bytes, s.shutdown_grace_seconds, s.dtype) == (4096, 5.0, "bfloat16")

    got.clear()
    result = CliRunner().invoke(cli_app, ["serve", "--api-key", "flag"])
    assert result.exit_code == 0 and got[0].api_key == "flag" and got[0].max_num_seqs == 7 and got[0].model is None
    result = CliRunner().invoke(cli_app, ["serve", "--port", "99999"])
    assert result.exit_code != 0 and "port" in result.output
    assert not got[1:]


def test_server_binds_first_and_is_healthy_once_loaded(tiny_runtime):
    settings = ServeSettings(port=0, log_stats_interval=0.05)
    server = Server(create_app(None, settings), settings, log_level="warning")
    release = threading.Event()

    def load():
        release.wait(10)
        return tiny_runtime

    thread = threading.Thread(target=lambda: asyncio.run(server.run(load=load)), daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.uvicorn.started, what="the server to start")
        with httpx.Client(base_url=server.url, timeout=10) as http:
            r = http.get("/health")
            assert r.status_code == 503 and r.json()["error"]["message"] == "the model is still loading"
            release.set()
            wait_for(lambda: http.get("/health").status_code == 200, what="the model to load")
            r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200
        wait_for(lambda: server.stats._last is not None, what="a stats tick")
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_server_stops_when_the_model_cannot_load():
    settings = ServeSettings(port=0, log_stats_interval=0)
    server = Server(create_app(None, settings), settings, log_level="warning")

    def load():
        raise InvalidRequestError("no such model file")

    with pytest.raises(InvalidRequestError, match="no such model"):
        asyncio.run(asyncio.wait_for(server.run(load=load), 20))
