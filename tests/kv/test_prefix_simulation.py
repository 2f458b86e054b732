from __future__ import annotations

import pytest

from bulk.kv.prefix_simulation import simulate_prefix


def _chain(*tokens: int) -> tuple[int, ...]:
    """Keys that name whole prefixes, as the block cache's chained hashes do."""
    return tuple(hash(tokens[: i + 1]) % 1_000_003 for i in range(len(tokens)))


@pytest.mark.parametrize("strategy", ["lru", "lfu", "adaptive"])
def test_repeated_prefix_hits_all_but_new_blocks(strategy):
    system = (1, 2, 3, 4)
    requests = [_chain(*system, 10), _chain(*system, 11), _chain(*system, 10, 12)]
    # 5 + 5 + 6 blocks requested; hits: 0, then the 4 system blocks, then system + block 10.
    assert simulate_prefix(strategy, requests, capacity=64) == pytest.approx((0 + 4 + 5) / 16)


def test_a_block_counts_only_below_an_unbroken_chain():
    """With room for 3 blocks, a 4-block request keeps its first 3; asking again hits those 3 and
    recomputes the 4th, which cannot be cached: a tail is never cached without its parents."""
    request = _chain(1, 2, 3, 4)
    assert simulate_prefix("lru", [request, request], capacity=3) == pytest.approx(3 / 8)


def test_empty_stream():
    assert simulate_prefix("adaptive", [], capacity=4) == 0.0
