"""Fixtures for the storage tests: the real Redis (database 11) and PostgreSQL (a schema of our own)
on this machine, each emptied afterwards."""

from __future__ import annotations

import os
import uuid

import pytest

REDIS_URL = os.environ.get("BUL_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
DATABASE_URL = os.environ.get("BUL_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def redis_url():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def pg_schema():
    """A fresh schema name; dropped with everything in it afterwards."""
    import sqlalchemy as sa

    from bulk.storage.postgres_store import connect

    schema = f"bul_test_{uuid.uuid4().hex[:10]}"
    yield schema
    engine = connect(DATABASE_URL, 5.0)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


PROMPT = (
    "System: you are the planning assistant of a small bakery in Madrid. Answer briefly and concretely. "
    "User: Create marketing strategy for the new sourdough line, with a budget and a timeline."
)
