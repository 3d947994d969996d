"""The agent's side of the agent API: JSON over HTTP(S), outbound only, stdlib `urllib`.

Errors are sorted into three classes so that the loop can decide: `Unreachable`
(connection refused, timeout, 5xx: retry with backoff, keep Ray running), `Unauthorized`
(401/403: the token is wrong or revoked; log and retry slowly) and `ProtocolError`
(any other 4xx or a malformed body: a bug on one side).
"""

from __future__ import annotations

import json
import logging
import random
import urllib.error
import urllib.request
from typing import Any

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

    def _post(
        self, path: str, body: dict[str, Any], token: str | None = None, timeout_s: float | None = None,
    ) -> dict[str, Any]:
        url = self.base_url + API_PREFIX + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # The scheme is checked to be http(s) in __init__.
        request = urllib.request.Request(  # noqa: S310
            url, data=json.dumps(body).encode(), headers=headers, method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:  # noqa: S310
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = _read_detail(exc)
            if exc.code in (401, 403):
                raise Unauthorized(exc.code, detail) from exc
            if exc.code >= 500 or exc.code in (408, 429):
                raise Unreachable(f"HTTP {exc.code}: {detail}") from exc
            raise ProtocolError(f"HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:  # refused, DNS, reset, timeout
            raise Unreachable(str(getattr(exc, "reason", exc))) from exc
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
