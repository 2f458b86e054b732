"""`BULAPIClient`: the integration guide's REST client, with typed errors."""

from __future__ import annotations

from typing import Any

import requests

from bulk.client.errors import BULAPIError, answer_or_raise


class BULAPIClient:
    """`BULAPIClient("http://localhost:8002")`; `api_key` sends `Authorization: Bearer <key>`.
    Every method returns the decoded JSON answer or raises `BULAPIError` with the server's message."""

    def __init__(
        self, base_url: str = "http://localhost:8002", api_key: str | None = None, timeout: float = 60.0
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def process_query(self, query: str, priority: int = 1, **params: Any) -> dict[str, Any]:
        """Answer one query; `params` are the engine's (`max_new_tokens`, `temperature`, ...)."""
        return self._call("POST", "/api/query", {"query": query, "priority": priority, **params})

    def process_batch(self, queries: list[dict[str, Any]]) -> dict[str, Any]:
        """Start queries in the background: `{"status": "processing", "count", "task_ids"}`."""
        return self._call("POST", "/api/batch", queries)

    def get_task_status(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/task/{task_id}/status")

    def get_stats(self) -> dict[str, Any]:
        return self._call("GET", "/api/stats")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> BULAPIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self.session.request(method, self.base_url + path, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise BULAPIError(0, f"cannot reach {self.base_url}: {exc}") from exc
        return answer_or_raise(response.status_code, response.text, response.json)
