"""The one exception the BUL API clients raise for an error answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class BULAPIError(Exception):
    """The server answered with an error. `status_code` is the HTTP status, `message` the server's
    own message, `field` the request field it names (422s), `body` the decoded answer."""

    def __init__(self, status_code: int, message: str, field: str | None = None, body: Any = None) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.field = field
        self.body = body


def answer_or_raise(status_code: int, text: str, read_json: Callable[[], Any]) -> Any:
    """The decoded JSON of an answer (None when it is not JSON), or `BULAPIError` for a 4xx/5xx."""
    try:
        data = read_json()
    except ValueError:
        data = None
    if status_code >= 400:
        raise error_from_response(status_code, text, data)
    return data


def error_from_response(status_code: int, text: str, body: Any) -> BULAPIError:
    """Build the error from an answer in the server's shape (`error.message`, `detail`), or from any
    other body (a proxy's HTML page, say)."""
    message, field = text.strip()[:500] or f"HTTP {status_code}", None
    if isinstance(body, dict):
        error = body.get("error")
        detail = body.get("detail")
        if isinstance(error, dict) and error.get("message"):
            message, field = str(error["message"]), error.get("param")
        elif isinstance(detail, str):
            message = detail
        elif isinstance(detail, list) and detail and isinstance(detail[0], dict):
            message = str(detail[0].get("msg", message))
    return BULAPIError(status_code, message, field, body)
