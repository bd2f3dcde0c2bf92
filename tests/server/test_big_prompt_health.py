"""Issue 9 defect 11 end to end:
a real server tokenizing a 5 MB prompt still answers /health promptly. The server runs in a
subprocess so that the client's timing is not stalled by the server's GIL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.real_model
def test_health_answers_while_a_real_big_prompt_is_tokenized():
    cmd = [sys.executable, "-m", "parrot_core.cli", "serve", "--port", "0", "--max-model-len", "512", "--num-kv-blocks", "64",
           "--log-stats-interval", "0", "--max-request-body-bytes", str(16 * 2**20)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        port: list[int] = []

        def bound() -> bool:
            port[:] = [int(m.group(1)) for line in list(lines) if (m := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line))][:1]
            return bool(port) or proc.poll() is not None

        wait_for(bound, 60, "the server to bind")
        url = f"http://127.0.0.1:{port[0]}"

        def loaded() -> bool:
            time.sleep(0.1)
            return httpx.get(url + "/health", timeout=5).status_code == 200

        wait_for(loaded, 120, "the model to load")
        result: dict[str, httpx.Response] = {}
        big = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/completions", json={"prompt": "word " * 1_000_000, "max_tokens": 1}, timeout=120)))
        big.start()
        time.sleep(0.3)
        worst = 0.0
        with httpx.Client(base_url=url, timeout=30) as http:
            while big.is_alive():
                t0 = time.monotonic()
                assert http.get("/health").status_code == 200
                worst = max(worst, time.monotonic() - t0)
                time.sleep(0.05)
        big.join()
        assert result["r"].status_code == 400 and "maximum context length" in result["r"].json()["error"]["message"]
        assert worst < 1.0, f"/health took {worst:.2f} s while the prompt was tokenized"
    finally:
        proc.terminate()
        proc.wait(60)
