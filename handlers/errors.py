"""The one error type of the inference library: a client error with an HTTP status and a JSON body."""

from __future__ import annotations

from typing import Any


def error_body(status: int, type_: str, message: str) -> dict[str, Any]:
    """The JSON every error answer carries: {"code", "type", "message"}."""
    return {"code": status, "type": type_, "message": message}


class BadInput(Exception):
    """A client error: `status` is the HTTP code (4xx), `type` a short name, `message` what to send instead."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.type, self.message)
