"""The clients' error type: the server's message, status and field, whatever the body looks like."""

from __future__ import annotations

import socket

import pytest

from bulk.client import AsyncBULAPIClient, BULAPIClient, BULAPIError
from bulk.client.errors import error_from_response


def test_the_servers_422_shape_gives_message_and_field():
    body = {
        "detail": [{"loc": ["body", "priority"], "msg": "priority: must be between -1000 and 1000"}],
        "error": {"message": "priority: must be between -1000 and 1000", "param": "priority", "code": 422},
    }
    error = error_from_response(422, "", body)
    assert isinstance(error, BULAPIError)
    assert (error.status_code, error.field) == (422, "priority")
    assert "between -1000 and 1000" in error.message and "HTTP 422" in str(error)


def test_fastapi_detail_strings_and_foreign_bodies():
    assert error_from_response(404, "", {"detail": "unknown task 'x'"}).message == "unknown task 'x'"
    assert error_from_response(502, "<html>Bad gateway</html>", None).message == "<html>Bad gateway</html>"
    assert error_from_response(500, "", None).message == "HTTP 500"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_server_is_a_bul_api_error():
    client = BULAPIClient(f"http://127.0.0.1:{_closed_port()}", timeout=2)
    with pytest.raises(BULAPIError, match="cannot reach") as caught:
        client.get_stats()
    assert caught.value.status_code == 0


async def test_the_async_client_raises_the_same_error():
    async with AsyncBULAPIClient(f"http://127.0.0.1:{_closed_port()}", timeout=2) as client:
        with pytest.raises(BULAPIError, match="cannot reach"):
            await client.get_stats()
