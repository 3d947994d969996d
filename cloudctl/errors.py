"""Failures as sentences: every error a user can meet becomes `CloudctlError` with clear lines."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (7 ms): `cloudctl sync` starts its walk first
if TYPE_CHECKING:
    from typing import Any

INTERRUPTED = "Interrupted; what was already requested goes on (`cloudctl status` shows it)."


class CloudctlError(Exception):
    """A failure to show as one clear sentence (plus detail lines) on stderr, then exit `code`."""

    def __init__(self, message: str, details: list[str] | None = None, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.code = code

    def lines(self) -> list[str]:
        return [self.message, *self.details]


def flatten_fields(fields: Any, prefix: str = "") -> list[str]:
    """Per-field messages of the error contract, one `path: message` line each.

    Handles nested objects (`head.instance_type`) and lists of objects (`worker_groups[1].max_workers`).
    """
    lines: list[str] = []
    if isinstance(fields, dict):
        for key, value in fields.items():
            nested = f"{prefix}.{key}" if prefix else str(key)
            path = prefix if key in ("non_field_errors", "__all__") else nested
            lines.extend(flatten_fields(value, path))
    elif isinstance(fields, list):
        if all(isinstance(item, str) for item in fields):
            for item in fields:
                lines.append(f"{prefix}: {item}" if prefix else item)
        else:
            for index, item in enumerate(fields):
                if item in ({}, [], None, ""):
                    continue
                lines.extend(flatten_fields(item, f"{prefix}[{index}]"))
    elif fields not in (None, ""):
        lines.append(f"{prefix}: {fields}" if prefix else str(fields))
    return lines


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def api_error(status: int, body: Any, *, not_found: str | None = None, retry_after: str | None = None) -> CloudctlError:
    """Turn an HTTP error status and the contract's error JSON into a `CloudctlError`."""
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message") or "").strip()
    fields = flatten_fields(error.get("fields") or {})
    if status == 401:
        return CloudctlError("The control plane rejected your token (401); run `cloudctl login` to sign in again.")
    if status == 403:
        reason = f": {message}" if message else ""
        return CloudctlError(_sentence(f"Permission denied (403){reason}") + " Your role in this workspace is too low.")
    if status == 404:
        return CloudctlError(_sentence(not_found or f"Not found (404){': ' + message if message else ''}"))
    if status == 409:
        return CloudctlError(_sentence(message or "The request conflicts with the current state (409)"))
    if status == 400:
        head = message or "The request is invalid"
        if fields:  # the server's message may repeat the fields; keep its lead and give one line per field
            return CloudctlError(head.split(":", 1)[0].rstrip(".") + ":", fields)
        return CloudctlError(_sentence(head))
    if status == 429:
        wait = f" Retry after {retry_after} seconds." if retry_after else " Try again shortly."
        return CloudctlError("The control plane is rate limiting you (429)." + wait)
    if status >= 500:
        return CloudctlError(f"The control plane failed with HTTP {status}; try again, or ask its operator to check "
                             "its logs.")
    return CloudctlError(_sentence(f"The control plane answered HTTP {status}{': ' + message if message else ''}"))
