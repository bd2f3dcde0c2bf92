"""schemathesis against the app's own OpenAPI schema, in-process (ASGI, no network), in
positive and negative modes: no 5xx, documented statuses, content types and response shapes;
afterwards no KV is leaked (`make_runtime`'s teardown waits for every block to come back).

The schemathesis pytest plugin does not run under pytest 9, so each operation's strategy is
driven with Hypothesis directly. `positive_data_acceptance` is left out: schema-valid data
may still be refused for what a schema cannot say (an unknown model name, an empty prompt,
a prompt longer than the model), and those answers are checked to be 4xx, never 5xx.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.generation.modes import GenerationMode

from parrot_core.server.app import create_app
from parrot_core.server.settings import ServeSettings

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
_PATHS = create_app(None).openapi()["paths"]
CASES = [
    (path, method.upper(), mode)
    for path, ops in _PATHS.items()
    for method, spec in ops.items()
    for mode in (POSITIVE, NEGATIVE)
    # negative mode needs something to make invalid: a body, or a non-path parameter
    # (any string is a valid path segment, e.g. DELETE /v1/session/{session_id})
    if mode is POSITIVE or "requestBody" in spec or any(p.get("in") != "path" for p in spec.get("parameters", []))
]
GENERATING = {"/v1/completions", "/v1/chat/completions"}


@pytest.mark.parametrize(("path", "method", "mode"), CASES, ids=[f"{m} {p} {mode.value}" for p, m, mode in CASES])
def test_api_fuzz(make_runtime, path, method, mode):
    # max_model_len 128 and at most 8 + 8 sequences: a big max_tokens or n is a fast 400, and
    # a chat without max_tokens (all the room left) stays short
    rt = make_runtime(max_model_len=128, max_num_seqs=8)
    app = create_app(rt, ServeSettings(served_model_name="tiny", max_waiting_requests=8, log_stats_interval=0))
    operation = schemathesis.openapi.from_asgi("/openapi.json", app)[path][method]
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
    def run(case) -> None:
        if mode is POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny"  # a random model name is (rightly) a 404 every time
        response = case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])
        statuses.append(response.status_code)
        assert response.status_code < 500, response.text

    run()
    rt.clear_suspended()  # generations it suspended (pid / token_quantum) hold KV until discarded
    for session_id in rt.chat_sessions.all_sessions():  # chat sessions it created hold KV until removed
        rt.chat_sessions.remove_session(session_id)
    assert statuses
    if mode is NEGATIVE:
        assert all(400 <= s < 500 for s in statuses), statuses
    elif path in GENERATING:
        assert any(s == 200 for s in statuses), statuses  # the fuzz reached generation
