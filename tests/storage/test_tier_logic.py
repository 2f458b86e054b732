"""The lower tiers' logic over fakes, in milliseconds: the fault guard's back-off (a failing in-memory
store, a fake clock), a tier's budget, and the write-back path. The same behaviours against the real
Redis and PostgreSQL stay in test_faults.py, test_tiers.py and test_resync.py (marked `services`)."""

from __future__ import annotations

import pytest
import torch

from bulk.errors import TierError
from bulk.storage import guard as guard_module
from bulk.storage.base import BlockStore
from bulk.storage.budget import BudgetedStore
from bulk.storage.guard import MAX_BACKOFF_SECONDS, GuardedStore
from bulk.storage.serialization import BlockRecord, loads
from bulk.storage.tiers import LowerTiers
from tests.helpers import wait_until


class DictStore(BlockStore[bytes]):
    """A lower tier in a dict that fails (`TierError`) while `down`, and counts the calls it got. It
    keeps no byte count (as Redis and PostgreSQL): a budget counts for it, and `sizes` answers a
    resync."""

    name = "fake"

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.down = False
        self.calls = 0
        self.evictions = 0

    def _call(self) -> None:
        self.calls += 1
        if self.down:
            raise TierError("the fake backend is down")

    def __len__(self) -> int:
        return len(self.data)

    def sizes(self, keys):
        self._call()
        return [len(self.data[k]) if k in self.data else None for k in keys]

    def contains(self, key: bytes) -> bool:
        self._call()
        return key in self.data

    def get_many(self, keys):
        self._call()
        return [self.data.get(k) for k in keys]

    def put_many(self, items) -> None:
        self._call()
        self.data.update(items)

    def delete(self, key: bytes) -> None:
        self._call()
        self.data.pop(key, None)

    def clear(self) -> None:
        self._call()
        self.data.clear()

    def close(self) -> None:
        pass


class FakeStore(DictStore):
    """A tier that keeps its own byte count, as the guard's stats read it."""

    @property
    def size_bytes(self) -> int:
        return sum(map(len, self.data.values()))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(guard_module, "time", fake)  # the guard's clock only
    return fake


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def guarded(store: BlockStore[bytes], retry_seconds: float) -> GuardedStore:
    """A tier as the factory builds one: the guard over the budget over the backend."""
    return GuardedStore(BudgetedStore(store, capacity_blocks=100, strategy="lru"), retry_seconds)


def test_a_failing_tier_is_bypassed_with_a_doubling_back_off_then_probed_back(clock):
    store = FakeStore()
    tier = guarded(store, retry_seconds=1.0)
    store.down = True
    assert tier.get_many([key(1), key(2)]) == [None, None]  # a failure is a miss, never an error
    assert not tier.healthy and tier.stats()["errors"] == 1
    waits = []
    for _ in range(7):
        calls = store.calls
        # Bypassed until the back-off has passed: the backend is not asked.
        wait = 0.0
        while True:
            clock.now += 0.25
            wait += 0.25
            assert tier.put_many([(key(1), b"x")]) is False
            if store.calls > calls:
                break
        waits.append(wait)
    # 1 s, doubling per consecutive failure, up to 16 x the retry time.
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0]
    assert tier.stats()["skipped"] > 0 and tier.stats()["errors"] == 8
    store.down = False
    clock.now += 16.0
    assert tier.put_many([(key(1), b"x")]) is True  # the probe succeeds: healthy again
    assert tier.healthy and tier.resync_due and store.data == {key(1): b"x"}
    assert tier.get_many([key(1)]) == [b"x"] and tier.stats()["writes"] == 1


def test_the_back_off_never_exceeds_a_minute(clock):
    store = FakeStore()
    tier = guarded(store, retry_seconds=10.0)  # 16 x 10 s would be 160 s
    store.down = True
    for _ in range(5):  # back-offs of 10, 20, 40, then capped
        tier.delete(key(1))
        clock.now += MAX_BACKOFF_SECONDS
    assert store.calls == 5  # each came once its back-off had passed
    tier.delete(key(1))
    clock.now += MAX_BACKOFF_SECONDS - 0.25
    tier.delete(key(1))
    assert store.calls == 6  # still bypassed just before the minute
    clock.now += 0.25
    tier.delete(key(1))
    assert store.calls == 7  # and probed at the minute, not at 16 x 10 s


def test_a_tier_budget_evicts_in_policy_order_and_deletes_from_the_backend():
    store = DictStore()
    tier = BudgetedStore(store, capacity_blocks=3, strategy="lru")
    tier.put_many([(key(i), b"v" * (i + 1)) for i in range(3)])
    assert tier.get(key(0)) == b"v"  # touched: key 1 is now the least recently used
    tier.put(key(3), b"vvvv")
    assert set(store.data) == {key(0), key(2), key(3)} and tier.evictions == 1 and len(tier) == 3
    assert tier.size_bytes == 1 + 3 + 4  # counted by the budget: the backend keeps no count
    tier.delete(key(2))
    assert len(tier) == 2 and tier.size_bytes == 5


def test_a_resync_forgets_what_the_backend_lost():
    store = DictStore()
    tier = BudgetedStore(store, capacity_blocks=10, strategy="lru")
    tier.put_many([(key(i), b"abc") for i in range(4)])
    del store.data[key(1)], store.data[key(2)]  # a restart, an expiry, another replica
    store.data[key(3)] = b"abcdef"  # rewritten elsewhere, larger
    assert tier.resync() == 2
    assert len(tier) == 2 and tier.size_bytes == 3 + 6 and tier.resynced_away == 2


def _record(tokens: tuple[int, ...]) -> BlockRecord:
    return BlockRecord(tokens, "none", "float32", (1, 2, 1, 2, 4), {"kv": torch.randn(1, 2, 1, 2, 4)})


def test_a_block_whose_write_failed_is_written_back_when_the_tier_returns():
    """Write-through fails while the tier is down; the block stays unwritten. Memory then evicts it:
    it is held, and the writer's idle retry writes it once the tier answers again."""
    store = FakeStore()
    store.down = True
    tiers = LowerTiers([guarded(store, retry_seconds=0.01)], secret=None, retry_seconds=0.02)
    try:
        in_memory: dict[bytes, BlockRecord] = {key(1): _record((1, 2)), key(2): _record((3, 4))}
        tiers.source = in_memory.get
        tiers.write(list(in_memory.items()))
        assert tiers.flush(10)
        wait_until(lambda: store.calls >= 2, 10, 0.01, "a retry while the tier is down")
        assert store.data == {}
        tiers.evicted(key(1), in_memory.pop(key(1)))  # held: no tier has it yet
        tiers.evicted(key(2), in_memory.pop(key(2)) and None)  # without its record: nothing to write
        # Two more failed calls: the second began after these evictions, so no retry still carries
        # key 2 when the tier comes back.
        calls = store.calls
        wait_until(lambda: store.calls >= calls + 2, 10, 0.01, "two more retries")
        store.down = False
        wait_until(lambda: key(1) in store.data, 10, 0.01, "the held block to be written back")
        assert loads(key(1), store.data[key(1)], None).tokens == (1, 2)
        assert key(2) not in store.data and tiers.dropped_writes == 0
    finally:
        tiers.close()
