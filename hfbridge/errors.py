"""Errors users see; the server maps ValidationError to HTTP 400 with `param` set."""
from __future__ import annotations

from typing import Any


class ValidationError(ValueError):
    """Bad user input (vLLM's VLLMValidationError): the message, and which parameter had which value."""

    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None):
        super().__init__(message)
        self.parameter = parameter
        self.value = value

    def __str__(self) -> str:
        base = super().__str__()
        if self.parameter is None:
            return base
        return f"{base} (parameter={self.parameter}, value={self.value!r})"
