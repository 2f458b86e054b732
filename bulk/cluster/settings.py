"""`bul cluster`'s own settings, `BUL_RAY_*`: apart from `app.py`, so that reading (and
documenting, `bulk.cli.settings_doc`) them does not import Ray."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from bulk.engine_settings import BulSettings


class ClusterSettings(BulSettings):
    """The cluster's own options, `BUL_RAY_*` (`bul cluster` flags win). Engine and server options
    are the usual `BUL_*` variables, read by every replica."""

    model_config = SettingsConfigDict(env_prefix="BUL_RAY_", extra="ignore")

    # `bul cluster`: join the Ray cluster at this address (`ray://host:10001`, `auto`); empty: start one.
    address: str | None = None
    # Engine replicas.
    replicas: int = Field(2, ge=1)
    # `prefix`: BUL's prefix-aware router; `pow2`: Ray's power-of-two choices.
    router: Literal["prefix", "pow2"] = "prefix"
    # Queue difference past which the replica holding the prefix is passed over for power-of-two choices.
    imbalance_threshold: float = Field(8.0, ge=0)
    # A replica holding less than this share of a request's blocks is not preferred for it.
    min_match_ratio: float = Field(0.1, ge=0, le=1)
    # Requests a replica takes at once (Serve's max_ongoing_requests): beyond, the router looks elsewhere.
    max_ongoing_requests: int = Field(64, ge=1)
    # How often each replica reports the blocks it holds to the routers.
    stats_period_s: float = Field(1.0, gt=0)
    # At most this many block ids per report (8 bytes each).
    report_blocks: int = Field(65_536, ge=0)
    # Ray CPUs each engine replica reserves.
    replica_cpus: float = Field(1.0, ge=0)
    # At most this many engine replicas on one Ray node (Serve's max_replicas_per_node); empty: no limit.
    max_replicas_per_node: int | None = Field(None, ge=1)
    # Ingress replicas (each keeps its own rate limits and batch tasks: see docs/cluster.md).
    ingress_replicas: int = Field(1, ge=1)
    # Requests one ingress replica takes at once.
    ingress_max_ongoing_requests: int = Field(1024, ge=1)
    # Times a request is sent again when its replica dies under it.
    retries: int = Field(4, ge=0)
