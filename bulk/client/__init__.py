"""Python clients for the BUL API: `BULAPIClient` (requests) and `AsyncBULAPIClient` (httpx)."""

from bulk.client.async_client import AsyncBULAPIClient
from bulk.client.errors import BULAPIError
from bulk.client.sync_client import BULAPIClient

__all__ = ["AsyncBULAPIClient", "BULAPIClient", "BULAPIError"]
