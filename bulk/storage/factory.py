"""Builds the lower tiers a configuration asks for. Redis and PostgreSQL client libraries are
imported only when configured, so the embedded default (memory + disk) needs neither."""

from __future__ import annotations

import logging
import os

from bulk.config import KVCacheConfig
from bulk.errors import TierError
from bulk.storage.budget import BudgetedStore
from bulk.storage.guard import GuardedStore
from bulk.storage.tiers import LowerTiers

log = logging.getLogger(__name__)

SECRET_ENV = "BUL_CACHE_SECRET"  # noqa: S105 (the variable name, not a secret)


def cache_secret(config: KVCacheConfig) -> bytes | None:
    secret = config.cache_secret or os.environ.get(SECRET_ENV)
    return secret.encode() if secret else None


def build_lower_tiers(config: KVCacheConfig) -> LowerTiers | None:
    """Disk (when persistence is on), Redis, PostgreSQL, in that order; None when none is configured.
    A backend that cannot be reached now is still built: its guard retries it later."""
    tiers: list[GuardedStore] = []

    def add(store: object, max_tokens: int) -> None:
        budget = BudgetedStore(store, max(1, max_tokens // config.block_size), config.cache_strategy)
        tiers.append(GuardedStore(budget, config.tier_retry_seconds))

    if config.enable_persistence:
        from bulk.storage.disk import DiskBlockStore

        try:
            add(DiskBlockStore(config.persistence_path), config.persistence_max_tokens)
        except TierError as exc:
            log.error("persistence disabled: %s", exc)
    if config.redis_url:
        from bulk.storage.redis_store import RedisStore

        add(
            RedisStore(config.redis_url, ttl=config.redis_ttl, timeout=config.tier_timeout),
            config.redis_max_tokens,
        )
    if config.database_url:
        from bulk.storage.postgres_store import PostgresTable

        add(
            PostgresTable(config.database_url, schema=config.database_schema, timeout=config.tier_timeout),
            config.database_max_tokens,
        )
    return LowerTiers(tiers, cache_secret(config), config.tier_retry_seconds) if tiers else None
