"""PostgreSQL writes are cut into statements of bounded size: a long prompt's blocks (tens of MB with a
real model) once went in one INSERT, outgrew the statement timeout, and never landed. Real PostgreSQL,
a schema of our own."""

from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa

from bulk.storage import postgres_store
from bulk.storage.postgres_store import PostgresTable, _chunks_by_bytes, connect
from tests.storage.conftest import DATABASE_URL


@pytest.fixture
def table():
    name = f"bul_writes_{uuid.uuid4().hex[:10]}"
    store = PostgresTable(DATABASE_URL, schema=name)
    yield store
    store.close()
    engine = connect(DATABASE_URL, 5.0)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    engine.dispose()


def test_rows_are_cut_by_bytes_in_order():
    rows = [{"key": i, "value": b"x" * n} for i, n in enumerate([3, 3, 3, 9, 1, 1])]
    chunks = list(_chunks_by_bytes(rows, 6))
    assert [[r["key"] for r in c] for c in chunks] == [[0, 1], [2], [3], [4, 5]]  # 9 > 6 goes alone
    assert list(_chunks_by_bytes([], 6)) == []


@pytest.mark.services
def test_a_write_larger_than_one_statement_lands_whole(table, monkeypatch):
    # 48 blocks of 360 KiB (SmolLM2's 16-token block in bfloat16): 17 MB, under the default 0.5 s
    # statement timeout only because it goes as several statements of at most 4 MiB here.
    monkeypatch.setattr(postgres_store, "WRITE_CHUNK_BYTES", 4 << 20)
    statements = []
    sa.event.listen(table.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    items = [(os.urandom(32), os.urandom(368_640)) for _ in range(48)]
    table.put_many(items)
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    assert len(inserts) == 5  # ceil(48 / 11 blocks per 4 MiB)
    assert table.get_many([k for k, _ in items]) == [v for _, v in items]
