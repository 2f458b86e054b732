"""The KV range allocator: ranges never overlap, never exceed the pool, and merge back when freed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulk.kv.slots import SlotAllocator


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40), st.integers(0, 10**6)), max_size=200))
def test_ranges_stay_disjoint_and_within_capacity(operations):
    allocator = SlotAllocator(100)
    taken: dict[int, int] = {}
    for allocate, length, pick in operations:
        if allocate or not taken:
            start = allocator.allocate(length)
            if start is None:
                # Refused only when no free run is long enough.
                assert allocator.largest_free() < length
                continue
            assert start >= 0 and start + length <= 100
            assert all(start + length <= s or s + n <= start for s, n in taken.items())
            taken[start] = length
        else:
            start = sorted(taken)[pick % len(taken)]
            allocator.free(start)
            del taken[start]
        assert allocator.used == sum(taken.values()) <= 100
    for start in list(taken):
        allocator.free(start)
    # Everything merged back into one run.
    assert allocator.used == 0 and allocator.largest_free() == 100 and allocator.allocate(100) == 0


def test_first_fit_reuses_the_lowest_range():
    allocator = SlotAllocator(100)
    a, b, c = allocator.allocate(30), allocator.allocate(30), allocator.allocate(30)
    assert (a, b, c) == (0, 30, 60)
    allocator.free(a)
    assert allocator.allocate(40) is None  # 30 + 10 free, but not in one run
    assert allocator.allocate(20) == 0
    allocator.free(b)
    assert allocator.largest_free() == 40  # 20..60 merged
    with pytest.raises(KeyError):
        allocator.free(b)
