"""The agent's side of the agent API: JSON over HTTP(S), outbound only, stdlib `urllib`.

Errors are sorted into three classes so that the loop can decide: `Unreachable`
(connection refused, timeout, 5xx: retry with backoff, keep Ray running), `Unauthorized`
(401/403: the token is wrong or revoked; log and retry slowly) and `ProtocolError`
(any other 4xx or a malformed body: a bug on one side).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

API_PREFIX = "/api/agent/v1"


class ClientError(Exception):
    """Base class of the errors the client raises."""


class Unreachable(ClientError):
    """The control plane did not answer usefully: retry later."""


class Unauthorized(ClientError):
    """401/403: the token was refused."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


class ProtocolError(ClientError):
    """An unexpected 4xx or a body that is not the JSON object we expect."""


class NotFound(ProtocolError):
    """404: the job or blob is not (or no longer) ours to read."""


class Backoff:
    """Exponential backoff with full jitter, capped (AWS architecture blog's "full jitter")."""

    def __init__(self, base_s: float = 0.1, cap_s: float = 5.0, rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2**self.attempt))
        self.attempt += 1
        # Never below a small floor, so that a tight failure loop cannot spin.
        return max(self.base_s / 2, self._rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempt = 0


class AgentClient:
    """One control plane; one request at a time; no retries here (the caller owns the policy)."""

    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"control_plane_url must be http(s): {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def register(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._post("/register", body)

    def heartbeat(
        self, node_id: str, node_token: str, body: dict[str, Any], timeout_s: float | None = None,
    ) -> dict[str, Any]:
        return self._post(f"/nodes/{node_id}/heartbeat", body, token=node_token, timeout_s=timeout_s)

    def job_manifest(self, node_id: str, node_token: str, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/nodes/{node_id}/jobs/{job_id}/manifest", token=node_token, timeout_s=60.0)

    def job_report(self, node_id: str, node_token: str, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._post(f"/nodes/{node_id}/jobs/{job_id}/report", body, token=node_token, timeout_s=30.0)

    def download_blob(self, node_id: str, node_token: str, sha256: str, out: BinaryIO,
                      chunk_size: int = 1024 * 1024) -> int:
        """Stream a blob of this node's workspace into `out`; returns the byte count (the caller verifies the hash)."""
        with self._open("GET", f"/nodes/{node_id}/blobs/{sha256}", token=node_token, timeout_s=60.0,
                        accept="*/*") as response:
            size = 0
            while chunk := response.read(chunk_size):
                out.write(chunk)
                size += len(chunk)
            return size

    def _post(
        self, path: str, body: dict[str, Any], token: str | None = None, timeout_s: float | None = None,
    ) -> dict[str, Any]:
        return self._request("POST", path, body, token=token, timeout_s=timeout_s)

    @contextlib.contextmanager
    def _open(self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None,
              timeout_s: float | None = None, accept: str = "application/json") -> Iterator[Any]:
        url = self.base_url + API_PREFIX + path
        headers = {"Accept": accept}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # The scheme is checked to be http(s) in __init__.
        request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
        try:
            response = urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s)  # noqa: S310
        except urllib.error.HTTPError as exc:
            detail = _read_detail(exc)
            if exc.code in (401, 403):
                raise Unauthorized(exc.code, detail) from exc
            if exc.code >= 500 or exc.code in (408, 429):
                raise Unreachable(f"HTTP {exc.code}: {detail}") from exc
            if exc.code == 404:
                raise NotFound(f"HTTP 404: {detail}") from exc
            raise ProtocolError(f"HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:  # refused, DNS, reset, timeout
            raise Unreachable(str(getattr(exc, "reason", exc))) from exc
        try:
            yield response
        except (OSError, TimeoutError) as exc:  # the connection broke mid-body
            raise Unreachable(str(exc)) from exc
        finally:
            response.close()

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        with self._open(method, path, body, token=token, timeout_s=timeout_s) as response:
            raw = response.read()
        try:
            parsed = json.loads(raw or b"{}")
        except ValueError as exc:
            raise ProtocolError(f"response is not JSON: {raw[:200]!r}") from exc
        if not isinstance(parsed, dict):
            raise ProtocolError("response is not a JSON object")
        return parsed


def _read_detail(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read(500).decode(errors="replace")
    except Exception:  # the body is only for the log line
        return ""
