"""Builds the lower tiers a configuration asks for. Redis and PostgreSQL client libraries are
imported only when configured, so the embedded default (memory + disk) needs neither."""

from __future__ import annotations

import logging

from bulk.config import SECRET_ENV, SECRET_REQUIRED, KVCacheConfig
from bulk.errors import InvalidConfigError, TierError
from bulk.storage.base import BlockStore
from bulk.storage.budget import BudgetedStore
from bulk.storage.guard import GuardedStore
from bulk.storage.tiers import LowerTiers

log = logging.getLogger(__name__)


def cache_secret(config: KVCacheConfig) -> bytes | None:
    return config.signing_secret()


def build_lower_tiers(config: KVCacheConfig) -> LowerTiers | None:
    """Disk (when persistence is on), Redis, PostgreSQL, in that order; None when none is configured.
    A backend that cannot be reached now is still built: its guard retries it later."""
    tiers: list[GuardedStore] = []
    secret = cache_secret(config)
    if config.shared_tiers and secret is None:
        if not config.allow_unsigned_shared_tiers:  # BUL_CACHE_SECRET was unset after the config was built
            raise InvalidConfigError("cache_secret", SECRET_REQUIRED)
        # The explicit opt-out: say what it costs every time it takes effect.
        log.warning(
            "allow_unsigned_shared_tiers is set and %s is empty: blocks read from the %s tier(s) carry a "
            "plain SHA-256, so whoever can write there can have forged KV served. Set %s to sign them.",
            SECRET_ENV,
            " and ".join(config.shared_tiers),
            SECRET_ENV,
        )

    def add(store: BlockStore[bytes], max_tokens: int) -> None:
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
    if not tiers:
        return None
    return LowerTiers(tiers, secret, config.tier_retry_seconds, config.tier_resync_seconds)
