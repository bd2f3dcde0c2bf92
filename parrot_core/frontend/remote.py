"""`P.connect(url)`: the program API against a running `parrot-core serve`.

    with P.connect("http://127.0.0.1:8000") as rt:
        print(summarize(doc="...").get())

The same semantic functions run unchanged: calls go to the server's session, variables are
`RemoteVariable` proxies whose `get()` blocks on the server. Native functions run here, in the
caller's process, in a background thread: they wait for their inputs on the server and send
their outputs back.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from parrot_core.errors import InvalidRequestError, NotFoundError, ParrotError, RuntimeClosedError, UnknownVariableError
from parrot_core.graph import Parameter, PerfCriteria, RequestMetadata, SemanticVariable

SESSION_HEADER = "X-Session-Token"


class RemoteVariable:
    """A semantic variable held by the server."""

    def __init__(self, client: RemoteRuntime, var_id: str) -> None:
        self._client = client
        self.var_id = var_id
        self.done = False  # set or failed from this client (a native function's output)

    @property
    def id(self) -> str:
        return self.var_id

    def __repr__(self) -> str:
        return f"RemoteVariable({self.var_id!r})"

    def get(self, criteria: PerfCriteria | str | None = None, timeout: float | None = None) -> str:
        params: dict[str, Any] = {"session_id": self._client.session_id}
        if criteria is not None:
            params["criteria"] = PerfCriteria.parse(criteria).value
        if timeout is not None:
            params["timeout"] = timeout
        data = self._client._request("GET", f"/v1/semantic_var/{self.var_id}", params=params, read_timeout=None)
        return data["content"]

    async def aget(self, criteria: PerfCriteria | str | None = None, timeout: float | None = None) -> str:
        return await asyncio.to_thread(self.get, criteria, timeout)

    def set(self, content: str) -> None:
        self._client._request("POST", f"/v1/semantic_var/{self.var_id}", json={"session_id": self._client.session_id, "content": content})
        self.done = True

    def fail(self, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}"
        self._client._request("POST", f"/v1/semantic_var/{self.var_id}", json={"session_id": self._client.session_id, "error": message})
        self.done = True


class RemoteRuntime:
    """A session on a server, usable wherever semantic functions need a runtime."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self._closed = False
        data = self._request("POST", "/v1/session")
        self.session_id: str = data["session_id"]
        self._http.headers[SESSION_HEADER] = data["session_auth"]
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> RemoteRuntime:
        from parrot_core.frontend.runtime import _CURRENT

        _CURRENT.append(self)  # type: ignore[arg-type]
        return self

    def __exit__(self, *exc: object) -> None:
        from parrot_core.frontend.runtime import _CURRENT

        if self in _CURRENT:
            _CURRENT.remove(self)  # type: ignore[arg-type]
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Remove the session on the server (its variables and KV go) and close the client."""
        if self._closed:
            return
        for t in self._threads:
            t.join(timeout=30)
        try:
            self._request("DELETE", f"/v1/session/{self.session_id}")
        finally:
            self._closed = True
            self._http.close()

    # -- what semantic functions call --------------------------------------------------------
    def submit_call(
        self, template: str, parameters: Sequence[Parameter], literals: dict[str, str], metadata: RequestMetadata
    ) -> dict[str, RemoteVariable]:
        body = {
            "session_id": self.session_id,
            "template": template,
            "parameters": [
                {"name": p.name, "is_output": p.is_output, "var_id": p.var_id, "value": p.value, "sampling_config": p.sampling}
                for p in parameters
            ],
            "literals": literals,
            "metadata": {
                "cache_prefix": metadata.cache_prefix,
                "fuse_fill": metadata.fuse_fill,
                "criteria": metadata.criteria.value if metadata.criteria else None,
                "models": list(metadata.models),
            },
        }
        data = self._request("POST", "/v1/semantic_call", json=body)
        return {name: RemoteVariable(self, var_id) for name, var_id in data["outputs"].items()}

    def variable(self, name: str = "", content: str | None = None) -> RemoteVariable:
        data = self._request("POST", "/v1/semantic_var", json={"session_id": self.session_id, "name": name, "content": content})
        return RemoteVariable(self, data["var_id"])

    def submit_native(
        self, func: Callable[..., Any], name: str, inputs: dict[str, Any], outputs: list[str], criteria: PerfCriteria | None
    ) -> dict[str, RemoteVariable]:
        outs = {k: self.variable(k) for k in outputs}
        ins = {k: v if isinstance(v, RemoteVariable) else _ready(k, v) for k, v in inputs.items()}

        def run() -> None:
            try:
                func(**ins, **outs)
                error: BaseException = ParrotError(f"native function {name!r} returned without setting its output")
            except BaseException as e:  # noqa: BLE001 - sent to the server as the outputs' failure
                error = e
            for sv in outs.values():
                if not sv.done:
                    sv.fail(error)

        thread = threading.Thread(target=run, name=f"native-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return outs

    # -- transport ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, read_timeout: float | None = 30.0, **kwargs: Any) -> dict[str, Any]:
        if self._closed:
            raise RuntimeClosedError("this connection is closed")
        timeout = httpx.Timeout(30.0, read=read_timeout)
        response = self._http.request(method, path, timeout=timeout, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - a non-JSON error body
                message = response.text
            raise _error_for(response.status_code, message)
        return response.json()


def connect(url: str, *, api_key: str | None = None) -> RemoteRuntime:
    """Open a session on a parrot-core server; use it as a context manager."""
    return RemoteRuntime(url, api_key=api_key)


def _ready(name: str, value: str) -> SemanticVariable:
    if not isinstance(value, str):
        raise InvalidRequestError(f"input {name!r} must be text or a variable")
    sv = SemanticVariable(f"local:{name}", name)
    sv.set(value)
    return sv


def _error_for(status: int, message: str) -> ParrotError:
    if status == 404:
        return UnknownVariableError(message) if "variable" in message else NotFoundError(message)
    if status in (400, 409, 422):
        return InvalidRequestError(message)
    return ParrotError(f"server answered {status}: {message}")
