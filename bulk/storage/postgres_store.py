"""PostgreSQL as a key-value table: the PostgreSQL KV tier (`bul_kv_blocks`, bytea keys) and the
guide's `PostgresCacheAdapter` (`cache_entries`, text keys) are both this class, so the connection,
the schema creation, the upsert and the error translation exist once.

A table is `(key, value bytea, created_at, accessed_at)`. Reads touch `accessed_at` in the same
statement (`UPDATE ... RETURNING`), one round trip per `READ_CHUNK_KEYS` keys of a batch; writes are
upserts, a statement per `WRITE_CHUNK_BYTES` (bounded statements, each inside the statement timeout).
The schema and table are created on first use. SQLAlchemy 2 Core with psycopg 3; any database error
becomes `TierError` here.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.dialects.postgresql import BYTEA, insert

from bulk.errors import TierError
from bulk.storage.base import BlockStore

BLOCK_TABLE = "bul_kv_blocks"


@contextlib.contextmanager
def _translate_errors() -> Iterator[None]:
    try:
        yield
    except (sa.exc.SQLAlchemyError, psycopg.Error) as exc:
        raise TierError(f"postgres: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


# Bytes of values per INSERT: about 0.07 s of PostgreSQL's time on the development machine, far
# inside the default 0.5 s statement timeout.
WRITE_CHUNK_BYTES = 8 << 20


# Keys per read statement: the values come back in the answer, so a long prefix read in one statement
# is as big as its write was (128 blocks, 47 MB, for 2048 tokens of SmolLM2 in bfloat16) and met the
# same statement timeout. 16 of those blocks are 5.6 MiB, inside WRITE_CHUNK_BYTES; the 128 blocks
# came back in 44-51 ms as 8 statements, 51-67 ms as one (development machine, local server).
READ_CHUNK_KEYS = 16


def _chunks_by_bytes(rows: list[dict[str, Any]], limit: int) -> Iterator[list[dict[str, Any]]]:
    """`rows` in order, cut into runs whose values hold at most `limit` bytes (a larger value alone)."""
    chunk: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        if chunk and size + len(row["value"]) > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += len(row["value"])
    if chunk:
        yield chunk


def connect(url: str, timeout: float) -> sa.Engine:
    """An engine on psycopg 3 (plain `postgresql://` URLs would pick psycopg2), with connect and
    statement timeouts so that a stuck server costs a bounded wait."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            url = "postgresql+psycopg://" + url.removeprefix(plain)
    return sa.create_engine(
        url,
        pool_pre_ping=True,
        pool_size=2,
        connect_args={
            "connect_timeout": max(1, round(timeout)),
            "options": f"-c statement_timeout={max(1, int(timeout * 1000))}",
        },
    )


def _driver(conn: sa.Connection) -> psycopg.Connection[Any]:
    """psycopg's own connection under SQLAlchemy's (a checked-out connection always has one)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    return cast("psycopg.Connection[Any]", driver)


class PostgresTable(BlockStore[bytes]):
    name = "postgres"

    def __init__(
        self,
        url: str,
        *,
        table: str = BLOCK_TABLE,
        text_keys: bool = False,
        schema: str | None = None,
        timeout: float = 0.5,
    ) -> None:
        self.engine = connect(url, timeout)
        # A new connection (the pool's pre-ping replaces dead ones by itself) may mean a restarted or
        # restored server: the tiered store resynchronises the budget when this grows.
        self.connections_opened = 0
        sa.event.listen(self.engine, "connect", self._opened)
        self.schema = schema
        self.table = sa.Table(
            table,
            sa.MetaData(schema=schema),
            sa.Column("key", sa.Text if text_keys else BYTEA, primary_key=True),
            sa.Column("value", BYTEA, nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
            sa.Column(
                "accessed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
            ),
        )
        self._created = False
        self._create_lock = threading.Lock()

    def _opened(self, *_: object) -> None:
        self.connections_opened += 1

    @contextlib.contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        with _translate_errors(), self.engine.begin() as conn:
            if not self._created:
                self._create(conn)
            yield conn

    def _create(self, conn: sa.Connection) -> None:
        with self._create_lock:
            if self.schema:
                conn.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
            self.table.create(conn, checkfirst=True)
            self._created = True

    def contains(self, key: bytes | str) -> bool:
        with self._begin() as conn:
            return conn.execute(sa.select(1).where(self.table.c.key == key)).first() is not None

    def get(self, key: bytes | str) -> bytes | None:
        return self.get_many([key])[0]

    def put(self, key: bytes | str, value: bytes) -> None:
        self.put_many([(key, value)])

    def delete(self, key: bytes | str) -> None:
        with self._begin() as conn:
            conn.execute(sa.delete(self.table).where(self.table.c.key == key))

    def clear(self) -> None:
        with self._begin() as conn:
            conn.execute(sa.delete(self.table))

    def close(self) -> None:
        self.engine.dispose()

    def get_many(self, keys: Sequence[bytes | str]) -> list[bytes | None]:
        if not keys:
            return []
        # Straight through psycopg with a binary cursor: in SQLAlchemy's default text format every
        # bytea value would cross the socket hex-encoded, twice its size, and be decoded here
        # (3x slower for a 2048-token prefix).
        statement = sql.SQL(
            "UPDATE {} SET accessed_at = now() WHERE key = ANY(%s) RETURNING key, value"
        ).format(sql.Identifier(*filter(None, (self.schema, self.table.name))))
        found: dict[bytes | str, bytes] = {}
        # One statement (and transaction, as writes: its row locks go with it) per READ_CHUNK_KEYS
        # keys, so that the statement timeout bounds each and a long prefix is still read whole.
        for start in range(0, len(keys), READ_CHUNK_KEYS):
            chunk = list(keys[start : start + READ_CHUNK_KEYS])
            with self._begin() as conn, _driver(conn).cursor(binary=True) as cursor:
                rows = cursor.execute(statement, (chunk,)).fetchall()
            found.update((bytes(k) if isinstance(k, bytes | memoryview) else k, bytes(v)) for k, v in rows)
        return [found.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[bytes | str, bytes]]) -> None:
        # One statement per WRITE_CHUNK_BYTES: the statement timeout bounds each, and a long
        # prompt's blocks in one INSERT (47 MB for 2048 tokens of SmolLM2 in bfloat16) outgrew it.
        for rows in _chunks_by_bytes([{"key": k, "value": v} for k, v in items], WRITE_CHUNK_BYTES):
            statement = insert(self.table).values(rows)
            statement = statement.on_conflict_do_update(
                index_elements=[self.table.c.key],
                set_={"value": statement.excluded.value, "accessed_at": sa.func.now()},
            )
            with self._begin() as conn:
                conn.execute(statement)

    def sizes(self, keys: Sequence[bytes | str]) -> list[int | None]:
        """The stored length of each key, None where absent, in one query (no value crosses the
        socket, and `accessed_at` is left alone)."""
        if not keys:
            return []
        statement = sql.SQL("SELECT key, octet_length(value) FROM {} WHERE key = ANY(%s)").format(
            sql.Identifier(*filter(None, (self.schema, self.table.name)))
        )
        with self._begin() as conn, _driver(conn).cursor(binary=True) as cursor:
            rows = cursor.execute(statement, (list(keys),)).fetchall()
        found = {bytes(k) if isinstance(k, bytes | memoryview) else k: int(n) for k, n in rows}
        return [found.get(k) for k in keys]

    def keys(self) -> list[bytes]:
        """Every key, least recently accessed first (only the tier's bytea table is ever listed)."""
        with self._begin() as conn:
            rows = conn.execute(sa.select(self.table.c.key).order_by(self.table.c.accessed_at)).all()
        return [bytes(k) if isinstance(k, memoryview) else k for (k,) in rows]
