"""`AsyncBULAPIClient`: the same methods as `BULAPIClient`, awaited, on httpx."""

from __future__ import annotations

from typing import Any

import httpx

from bulk.client.errors import BULAPIError, answer_or_raise


class AsyncBULAPIClient:
    """`async with AsyncBULAPIClient("http://localhost:8002") as client: await client.process_query(...)`."""

    def __init__(
        self, base_url: str = "http://localhost:8002", api_key: str | None = None, timeout: float = 60.0
    ):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def process_query(self, query: str, priority: int = 1, **params: Any) -> dict[str, Any]:
        return await self._call("POST", "/api/query", {"query": query, "priority": priority, **params})

    async def process_batch(self, queries: list[dict[str, Any]]) -> dict[str, Any]:
        return await self._call("POST", "/api/batch", queries)

    async def get_task_status(self, task_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/api/task/{task_id}/status")

    async def get_stats(self) -> dict[str, Any]:
        return await self._call("GET", "/api/stats")

    async def health(self) -> dict[str, Any]:
        return await self._call("GET", "/health")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncBULAPIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise BULAPIError(0, f"cannot reach {self.base_url}: {exc}") from exc
        return answer_or_raise(response.status_code, response.text, response.json)
