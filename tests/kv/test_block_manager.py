import json
import threading
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulk.kv.block_manager import BlockManager, PrefixLease
from bulk.kv.hashing import chain_hashes, namespace_digest

STRATEGIES = ["lru", "lfu", "adaptive"]
NS = namespace_digest("demo", 4, "float32", "none")


def make(capacity=16, block_size=4, strategy="lru", evicted=None):
    on_evict = evicted.append if evicted is not None else None
    return BlockManager(capacity, block_size, strategy, NS, on_evict=on_evict)


def admit(manager, tokens):
    """Cache every full block of `tokens` and release the lease; returns the lease's hashes."""
    lease = manager.acquire(tokens)
    manager.extend(lease, tokens)
    manager.release(lease)
    return lease.hashes


class ParityHashManager(BlockManager):
    """Hashes only each token's parity: an honest way to make two different blocks share a hash."""

    def _hash_chain(self, token_ids, parent):
        return chain_hashes([t % 2 for t in token_ids], self.block_size, self.namespace, parent)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shared_prefix_hits(strategy):
    m = make(strategy=strategy)
    a = list(range(12))
    lease = m.acquire(a)
    assert lease.hashes == [] and lease.num_tokens == 0
    admitted = m.extend(lease, a)
    assert admitted == list(enumerate(chain_hashes(a, 4, NS)))
    assert lease.num_tokens == 12
    m.release(lease)

    b = [*a[:8], 99, 98, 97, 96, 1]
    lease = m.acquire(b)
    assert lease.num_tokens == 8
    assert lease.hashes == chain_hashes(a, 4, NS)[:2]
    assert [i for i, _ in m.extend(lease, b)] == [2]
    m.release(lease)
    stats = m.stats()
    assert stats["token_queries"] == 12 + 12 and stats["token_hits"] == 8
    assert stats["blocks"] == 4 and stats["tokens"] == 16 and m.num_tokens == 16 and len(m) == 4


def test_max_tokens_respected():
    m = make()
    a = list(range(12))
    admit(m, a)
    for max_tokens, expected in [(None, 12), (11, 8), (8, 8), (7, 4), (3, 0), (0, 0), (-5, 0), (100, 12)]:
        lease = m.acquire(a, max_tokens=max_tokens)
        assert lease.num_tokens == expected, max_tokens
        m.release(lease)


def test_collision_guard():
    m = ParityHashManager(8, 4, "lru", NS)
    admit(m, [0, 1, 0, 1, 2, 2, 2, 2])
    # Same parities, different tokens: a hash hit that is not the same block.
    lease = m.acquire([2, 3, 2, 3, 2, 2, 2, 2])
    assert lease.hashes == [] and m.stats()["collisions"] == 1
    assert m.extend(lease, [2, 3, 2, 3]) == [] and lease.hashes == []
    assert m.stats()["collisions"] == 2
    m.release(lease)
    # The genuine prefix still hits in full.
    lease = m.acquire([0, 1, 0, 1, 2, 2, 2, 2])
    assert lease.num_tokens == 8
    m.release(lease)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tails_evicted_before_parents(strategy):
    evicted = []
    m = make(capacity=3, strategy=strategy, evicted=evicted)
    a = admit(m, list(range(12)))
    b = list(range(100, 104))
    lease = m.acquire(b)
    assert len(m.extend(lease, b)) == 1
    assert evicted == [a[2]]
    lease_b = lease.hashes
    assert a[0] in m and a[1] in m and a[2] not in m
    m.release(lease)
    # A longer chain that stays pinned forces the rest of `a` out, tail first.
    c = list(range(200, 212))
    lease = m.acquire(c)
    m.extend(lease, c)
    assert evicted[0] == a[2] and set(evicted[1:]) == {a[1], a[0], *lease_b}
    assert evicted.index(a[1]) < evicted.index(a[0])
    assert len(m) == 3 and m.stats()["evictions"] == len(evicted) == 4


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pinned_blocks_never_evicted(strategy):
    evicted = []
    m = make(capacity=2, strategy=strategy, evicted=evicted)
    a = list(range(8))
    holder = m.acquire(a)
    m.extend(holder, a)
    other = m.acquire([50, 51, 52, 53])
    assert m.extend(other, [50, 51, 52, 53]) == []
    assert other.hashes == [] and evicted == [] and len(m) == 2
    assert all(h in m for h in holder.hashes)
    assert m.stats()["pinned_blocks"] == 2
    m.release(other)
    m.release(holder)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_extend_stops_when_everything_is_pinned(strategy):
    m = make(capacity=3, strategy=strategy)
    a = list(range(8))
    holder = m.acquire(a)
    m.extend(holder, a)
    b = list(range(100, 112))
    lease = m.acquire(b)
    admitted = m.extend(lease, b)
    # One free slot: block 0 of b fits; block 1 would have to evict a pinned block.
    assert [i for i, _ in admitted] == [0] and len(lease.hashes) == 1 and len(m) == 3
    m.release(lease)
    m.release(holder)


def test_release_twice_raises():
    m = make()
    lease = m.acquire(list(range(8)))
    m.extend(lease, list(range(8)))
    m.release(lease)
    assert lease.released
    with pytest.raises(RuntimeError):
        m.release(lease)
    with pytest.raises(RuntimeError):
        m.extend(lease, list(range(12)))
    assert m.stats()["pinned_blocks"] == 0


def test_on_evict_runs_outside_the_lock_and_survives_errors(caplog):
    seen = []

    def on_evict(digest):
        # Asserting here would be swallowed with the error below: record what is seen instead.
        seen.append((digest, m._lock.locked(), digest in m))
        raise OSError("disk full")

    m = BlockManager(2, 4, "lru", NS, on_evict=on_evict)
    a = admit(m, list(range(8)))
    admitted = admit(m, list(range(100, 108)))
    assert seen == [(a[1], False, False), (a[0], False, False)] and len(admitted) == 2
    assert "on_evict failed" in caplog.text


def test_clear_keeps_pinned_blocks_and_stats_are_json():
    m = make()
    pinned_tokens = list(range(8))
    lease = m.acquire(pinned_tokens)
    m.extend(lease, pinned_tokens)
    other = admit(m, [*pinned_tokens, 9, 9, 9, 9])
    unrelated = admit(m, [5, 5, 5, 5])
    assert sorted(m.clear()) == sorted([other[2], *unrelated])
    assert len(m) == 2 and all(h in m for h in lease.hashes)
    stats = json.loads(json.dumps(m.stats()))
    assert stats["pinned_blocks"] == 2 and stats["capacity_blocks"] == 16
    m.release(lease)
    assert len(m.clear()) == 2 and len(m) == 0


def test_constructor_validates():
    with pytest.raises(ValueError):
        BlockManager(0, 4, "lru", NS)
    with pytest.raises(ValueError):
        BlockManager(4, 0, "lru", NS)
    with pytest.raises(ValueError):
        BlockManager(4, 4, "mru", NS)


def test_threads_keep_the_invariants():
    m = make(capacity=6, block_size=2)
    errors = []

    def worker(seed):
        try:
            for i in range(300):
                tokens = [(seed * 7 + i * j) % 5 for j in range(9)]
                lease = m.acquire(tokens, max_tokens=len(tokens) - 1)
                m.extend(lease, tokens)
                m.release(lease)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(m) <= 6 and m.stats()["pinned_blocks"] == 0


# ---- property test over random prompt streams -------------------------------------------------

BS = 2
token = st.integers(0, 3)


def check_invariants(m, open_leases, capacity):
    assert len(m) <= capacity
    assert len(m._policy) == len(m)
    refs = Counter(h for lease, _ in open_leases for h in lease.hashes)
    for digest, block in m._blocks.items():
        assert block.parent is None or block.parent in m, "orphaned block"
        assert block.refs == refs[digest]
        assert all(child in m for child in block.children)
    for lease, tokens in open_leases:
        assert lease.hashes == chain_hashes(tokens, BS, NS)[: len(lease.hashes)]
        assert all(h in m for h in lease.hashes)
    assert m.stats()["pinned_blocks"] == len(refs)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), capacity=st.integers(1, 6))
def test_random_prompt_streams(strategy, data, capacity):
    evicted = []
    open_leases: list[tuple[PrefixLease, list[int]]] = []

    def on_evict(digest):
        # on_evict errors are logged, not raised, so record the check and assert it afterwards.
        pinned = any(digest in lease.hashes for lease, _ in open_leases)
        evicted.append((digest, pinned, digest in m))

    m = BlockManager(capacity, BS, strategy, NS, on_evict=on_evict)
    prompts: list[list[int]] = [[]]
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        op = data.draw(st.sampled_from(["acquire", "extend", "release", "clear"]), label="op")
        if op == "acquire" or (not open_leases and op in ("extend", "release")):
            base = data.draw(st.sampled_from(prompts), label="base")
            cut = data.draw(st.integers(0, len(base)), label="cut")
            tokens = base[:cut] + data.draw(st.lists(token, max_size=8), label="suffix")
            prompts.append(tokens)
            max_tokens = data.draw(st.one_of(st.none(), st.just(len(tokens) - 1)), label="max")
            lease = m.acquire(tokens, max_tokens=max_tokens)
            limit = len(tokens) if max_tokens is None else max(0, max_tokens)
            assert lease.num_tokens <= limit
            open_leases.append((lease, tokens))
        elif op == "extend":
            i = data.draw(st.integers(0, len(open_leases) - 1), label="lease")
            lease, tokens = open_leases[i]
            tokens = tokens + data.draw(st.lists(token, max_size=6), label="generated")
            open_leases[i] = (lease, tokens)
            before = len(lease.hashes)
            admitted = m.extend(lease, tokens)
            assert [idx for idx, _ in admitted] == sorted({idx for idx, _ in admitted})
            assert all(before <= idx < len(lease.hashes) for idx, _ in admitted)
            prompts.append(tokens)
        elif op == "release":
            i = data.draw(st.integers(0, len(open_leases) - 1), label="lease")
            m.release(open_leases.pop(i)[0])
        elif op == "clear":
            m.clear()
        check_invariants(m, open_leases, capacity)
        assert not any(pinned or cached for _, pinned, cached in evicted), "evicted a pinned block"
    for lease, _ in open_leases:
        m.release(lease)
    check_invariants(m, [], capacity)
    assert m.stats()["evictions"] == len(evicted)
