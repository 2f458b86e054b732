"""Access traces for the eviction-policy benchmark, each built with a fixed seed to stress one
weakness. Keys are ints. A `Trace` with `requests` is a KV-prefix workload: each request is a chain
of block keys (a prompt's blocks, first to last), and a block is worth something only when every block
before it in the request is cached too."""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True)
class Trace:
    name: str
    description: str
    keys: list[int]  # the flat access sequence
    capacities: tuple[int, ...]  # cache sizes, in keys (blocks), to evaluate
    requests: tuple[tuple[int, ...], ...] | None = None  # KV-prefix workloads only

    @property
    def universe(self) -> int:
        return len(set(self.keys))


def _zipf_sampler(rng: random.Random, n: int, skew: float):
    """Keys 0..n-1 with P(k) proportional to 1 / (k + 1)^skew; the ranks are shuffled so that key
    ids say nothing about popularity."""
    cumulative = list(accumulate(1.0 / (k + 1) ** skew for k in range(n)))
    ids = list(range(n))
    rng.shuffle(ids)

    def draw(count: int) -> list[int]:
        return [ids[i] for i in rng.choices(range(n), cum_weights=cumulative, k=count)]

    return draw


def zipf(skew: float, n_keys: int = 10_000, n_accesses: int = 100_000, seed: int = 1) -> Trace:
    draw = _zipf_sampler(random.Random(seed), n_keys, skew)
    return Trace(
        f"zipf-{skew}",
        f"Zipf({skew}) over {n_keys} keys: a static popularity skew (LFU's home ground)",
        draw(n_accesses),
        (100, 500, 1000),
    )


def zipf_with_scans(seed: int = 2) -> Trace:
    """Zipf 0.9 traffic interrupted by one-time scans of never-seen keys (a batch job, a crawler)."""
    rng = random.Random(seed)
    draw = _zipf_sampler(rng, 10_000, 0.9)
    keys: list[int] = []
    fresh = 1_000_000
    for _ in range(20):
        keys += draw(5_000)
        keys += range(fresh, fresh + 2_000)
        fresh += 2_000
    return Trace(
        "zipf-scan",
        "Zipf(0.9) with a one-time scan of 2000 new keys every 5000 accesses",
        keys,
        (100, 500, 1000),
    )


def loop(seed: int = 3) -> Trace:
    """A loop over 1100 keys, slightly more than the largest cache: LRU's worst case (0 hits)."""
    rng = random.Random(seed)
    cycle = list(range(1_100))
    rng.shuffle(cycle)
    return Trace(
        "loop", "a cyclic scan of 1100 keys, just larger than the cache", cycle * 60, (500, 1000, 1050)
    )


def moving_hot_set(seed: int = 4) -> Trace:
    """90 % of accesses go to a hot set of 500 keys that is replaced every 10 000 accesses; the rest
    are uniform over 20 000 keys (a popularity that drifts: LFU's weakness)."""
    rng = random.Random(seed)
    keys: list[int] = []
    for _ in range(12):
        hot = rng.sample(range(20_000), 500)
        for _ in range(10_000):
            keys.append(rng.choice(hot) if rng.random() < 0.9 else rng.randrange(20_000))
    return Trace(
        "moving-hot-set",
        "a 500-key hot set (90 % of accesses) replaced every 10 000 accesses",
        keys,
        (250, 500, 1000),
    )


def kv_prefix(seed: int = 5) -> Trace:
    """Multi-turn chat sessions over a few shared system prompts, as KV block chains.

    Each request's prompt is its session's system prompt, then every earlier turn (question and
    answer), then the new question: so each request repeats a prefix of blocks and adds new ones at
    the end. A block's key names the whole chain up to it, as the block cache's chained hashes do."""
    rng = random.Random(seed)
    system_prompts = [rng.randint(4, 24) for _ in range(8)]  # length in blocks
    pick_system = _zipf_sampler(rng, len(system_prompts), 1.0)
    chain_ids: dict[tuple[int, ...], int] = {}

    def chain_keys(tokens: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(chain_ids.setdefault(tokens[: i + 1], len(chain_ids)) for i in range(len(tokens)))

    requests: list[tuple[int, ...]] = []
    active: list[list[int]] = []
    symbol = 100
    for _ in range(3_000):
        if len(active) < 40 or rng.random() < 0.05:
            system = pick_system(1)[0]
            active.append([-(system * 100 + i + 1) for i in range(system_prompts[system])])
        session = rng.choice(active)
        for _ in range(rng.randint(1, 4)):  # the new question, 1-4 blocks
            session.append(symbol)
            symbol += 1
        requests.append(chain_keys(tuple(session)))
        for _ in range(rng.randint(1, 6)):  # the answer, stored with the conversation
            session.append(symbol)
            symbol += 1
        if len(session) > 120 or rng.random() < 0.1:
            active.remove(session)  # the conversation ends
    keys = [k for request in requests for k in request]
    return Trace(
        "kv-prefix",
        "multi-turn sessions over 8 shared system prompts; keys are block chains (token hit ratio)",
        keys,
        (256, 1024, 4096),
        tuple(requests),
    )


def all_traces(seed_offset: int = 0) -> list[Trace]:
    """Every trace, each with its fixed seed plus `seed_offset` (0: the benchmark's own traces; other
    values draw fresh traces of the same shapes, to check that a result is not one seed's luck)."""
    k = seed_offset
    return [
        zipf(0.7, seed=1 + k),
        zipf(0.9, seed=1 + k),
        zipf(1.1, seed=1 + k),
        zipf_with_scans(2 + k),
        loop(3 + k),
        moving_hot_set(4 + k),
        kv_prefix(5 + k),
    ]
