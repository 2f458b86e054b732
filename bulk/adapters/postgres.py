"""`PostgresCacheAdapter`, as the guide uses it: `get` and `set` on a table
`cache_entries(key, value, created_at, accessed_at)`, created on first use; `get` touches
`accessed_at`. Values are JSON data or bytes, never pickled. SQLAlchemy 2 with psycopg 3."""

from __future__ import annotations

from typing import Any

from bulk.storage.postgres_store import PostgresTable
from bulk.storage.values import decode_value, encode_value

TABLE = "cache_entries"


class PostgresCacheAdapter:
    def __init__(self, database_url: str, *, schema: str | None = None, timeout: float = 5.0) -> None:
        self._table = PostgresTable(database_url, table=TABLE, text_keys=True, schema=schema, timeout=timeout)
        self.engine = self._table.engine  # the guide's attribute

    def get(self, key: str) -> Any | None:
        data = self._table.get(key)
        return None if data is None else decode_value(data)

    def set(self, key: str, value: Any) -> None:
        self._table.put(key, encode_value(value))

    def delete(self, key: str) -> None:
        self._table.delete(key)

    def clear(self) -> None:
        self._table.clear()

    def close(self) -> None:
        self._table.close()
