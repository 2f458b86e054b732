"""The storage interface's contract (`bulk.storage.base.BlockStore`), one test over every tier: memory,
disk, a budget over disk, the real Redis (database 8, emptied before and after) and the real PostgreSQL
(a schema of its own, dropped afterwards). A tier that passes here can stand anywhere a store is used."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from bulk.storage.base import BlockStore
from bulk.storage.budget import BudgetedStore
from bulk.storage.disk import DiskBlockStore
from bulk.storage.memory import MemoryBlockStore
from tests.storage.conftest import DATABASE_URL

REDIS_URL = "redis://127.0.0.1:6379/8"  # used by no other test


class Blob(bytes):
    """Bytes with the `nbytes` the memory tier counts (it holds `BlockRecord`s, which have it)."""

    @property
    def nbytes(self) -> int:
        return len(self)


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def _redis() -> Iterator[BlockStore[bytes]]:
    import redis

    from bulk.storage.redis_store import RedisStore

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    store = RedisStore(REDIS_URL, prefix=f"bul:contract:{uuid.uuid4().hex[:8]}:", ttl=60, timeout=5.0)
    try:
        yield store
    finally:
        store.close()
        client.flushdb()
        client.close()


def _postgres() -> Iterator[BlockStore[bytes]]:
    import sqlalchemy as sa

    from bulk.storage.postgres_store import PostgresTable, connect

    schema = f"bul_contract_{uuid.uuid4().hex[:10]}"
    store = PostgresTable(DATABASE_URL, schema=schema, timeout=5.0)
    try:
        yield store
    finally:
        store.close()
        engine = connect(DATABASE_URL, 5.0)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(
    params=[
        "memory",
        "disk",
        "budgeted-disk",
        pytest.param("redis", marks=pytest.mark.services),
        pytest.param("postgres", marks=pytest.mark.services),
    ]
)
def store(request, tmp_path) -> Iterator[BlockStore]:
    kind = request.param
    if kind == "memory":
        yield MemoryBlockStore()
    elif kind == "disk":
        yield DiskBlockStore(tmp_path)
    elif kind == "budgeted-disk":
        yield BudgetedStore(DiskBlockStore(tmp_path), capacity_blocks=100, strategy="lru")
    else:
        yield from _redis() if kind == "redis" else _postgres()


def test_every_tier_keeps_the_storage_contract(store: BlockStore):
    assert isinstance(store, BlockStore) and store.name
    a, b, c = key(1), key(2), key(3)
    assert store.get(a) is None and not store.contains(a)
    assert store.get_many([]) == [] and store.get_many([a, b]) == [None, None]

    store.put(a, Blob(b"first"))
    store.put_many([(b, Blob(b"second")), (c, Blob(b"third block"))])
    assert store.get(a) == b"first" and store.contains(b)
    # One batched read keeps the order asked for and answers None where a key is absent.
    assert store.get_many([c, key(9), a]) == [b"third block", None, b"first"]

    store.put(a, Blob(b"replaced"))  # a write over a key replaces its value
    assert store.get(a) == b"replaced"

    # The optional capabilities: None where a backend cannot tell, else the truth.
    stored = {a: b"replaced", b: b"second", c: b"third block"}
    listed = store.keys()
    assert listed is None or sorted(listed) == sorted(stored)
    sizes = store.sizes([a, key(9), c])
    assert sizes is None or sizes == [len(b"replaced"), None, len(b"third block")]
    size = store.size_bytes
    assert size is None or size == sum(map(len, stored.values()))

    store.delete(b)
    store.delete(key(9))  # deleting an absent key is not an error
    assert store.get_many([a, b, c]) == [b"replaced", None, b"third block"] and not store.contains(b)

    store.clear()
    assert store.get_many([a, b, c]) == [None, None, None]
    assert store.keys() in (None, [])
    assert store.size_bytes in (None, 0)
    store.close()
