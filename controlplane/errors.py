"""Domain errors that services raise; the API turns them into the contract's JSON shape."""

from __future__ import annotations


class DomainError(Exception):
    status_code = 400
    code = "invalid"

    def __init__(self, message: str, fields: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or {}


class ValidationFailed(DomainError):
    status_code = 400
    code = "validation_error"

    def __init__(self, fields: dict[str, list[str]], message: str = "The request is not valid.") -> None:
        super().__init__(message, fields)


class Conflict(DomainError):
    status_code = 409
    code = "conflict"
