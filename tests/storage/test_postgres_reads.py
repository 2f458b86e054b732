"""PostgreSQL reads are cut into statements of bounded size, as writes are (`test_postgres_writes.py`):
a long prefix's blocks came back from one `UPDATE ... RETURNING`, as big as the write that had outgrown
the statement timeout. Real PostgreSQL, a schema of our own; statements counted at psycopg's cursor."""

from __future__ import annotations

import math
import os
import uuid

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.storage import postgres_store
from bulk.storage.postgres_store import READ_CHUNK_KEYS, PostgresTable, connect
from tests.storage.conftest import DATABASE_URL

pytestmark = pytest.mark.services


@pytest.fixture
def schema():
    name = f"bul_reads_{uuid.uuid4().hex[:10]}"
    yield name
    engine = connect(DATABASE_URL, 5.0)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    engine.dispose()


@pytest.fixture
def reads(monkeypatch):
    """The number of keys of each read statement (`UPDATE ... RETURNING`) sent, in order."""
    sizes: list[int] = []
    execute = psycopg.Cursor.execute

    def counted(self, query, params=None, **kwargs):
        if isinstance(query, sql.Composable) and query.as_string(self).startswith("UPDATE"):
            sizes.append(len(params[0]))
        return execute(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counted)
    return sizes


def test_a_read_longer_than_one_statement_comes_back_whole_and_in_order(schema, reads):
    # 2 x READ_CHUNK_KEYS + 5 blocks of 360 KiB (SmolLM2's 16-token block in bfloat16): 13 MB, which
    # came back from one statement before; two keys absent, one of them in the middle.
    table = PostgresTable(DATABASE_URL, schema=schema)
    try:
        items = [(os.urandom(32), os.urandom(368_640)) for _ in range(2 * READ_CHUNK_KEYS + 5)]
        table.put_many(items)
        keys = [k for k, _ in items]
        keys.insert(READ_CHUNK_KEYS + 3, b"absent-" + os.urandom(25))
        keys.append(b"absent-" + os.urandom(25))
        reads.clear()
        values = table.get_many(keys)
    finally:
        table.close()
    stored = dict(items)
    assert values == [stored.get(k) for k in keys]
    assert sum(v is None for v in values) == 2
    assert reads == [READ_CHUNK_KEYS, READ_CHUNK_KEYS, len(keys) - 2 * READ_CHUNK_KEYS]
    assert len(reads) == math.ceil(len(keys) / READ_CHUNK_KEYS)


def test_a_prefix_longer_than_the_bound_is_found_whole_in_bounded_statements(
    schema, reads, monkeypatch, cache_secret, demo_model
):
    # The engine's path: a prompt of many blocks stored in PostgreSQL, the memory tier dropped, the
    # prompt again: every block comes back from PostgreSQL, `bound` keys per statement.
    bound = 3
    monkeypatch.setattr(postgres_store, "READ_CHUNK_KEYS", bound)
    config = KVCacheConfig(
        model="demo",
        device="cpu",
        response_cache=False,
        database_url=DATABASE_URL,
        database_schema=schema,
        cache_secret=cache_secret,
        tier_timeout=5.0,
    )
    request = {"query": "A long prefix read back from PostgreSQL, block by block. " * 4, "max_new_tokens": 4}
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        cold = engine.process_request_sync(request)
        assert engine.flush_storage(10)
        engine.drop_memory_tier()
        reads.clear()
        warm = engine.process_request_sync(request)
        tier = engine.get_stats()["tiers"]["postgres"]
    blocks = warm["cached_tokens"] // 16
    assert blocks > 2 * bound and warm["cached_tokens"] >= cold["prompt_tokens"] - 16
    assert warm["result"] == cold["result"]
    assert tier["hits"] == blocks and tier["errors"] == 0 and tier["corrupt"] == 0
    # One read of the whole prefix, in ceil(n / bound) statements of `bound` keys (the last: the rest).
    assert sum(reads) == blocks and len(reads) == math.ceil(blocks / bound)
    assert reads[:-1] == [bound] * (len(reads) - 1) and 0 < reads[-1] <= bound
