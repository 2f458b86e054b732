"""Adaptive Replacement Cache, a reference for the tests: no configuration reaches it (ADAPTIVE is
W-TinyLFU, `bulk/kv/policies/adaptive.py`). The tests hold it to the same policy contract as the
shipped policies and use it as the baseline ADAPTIVE is compared with.

ARC is from N. Megiddo and D. S. Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache",
USENIX FAST 2003. Resident keys sit in T1 (seen once recently) or T2 (seen at least twice); B1 and B2
remember the keys recently evicted from each (keys only, no data). A miss that lands in a ghost list
is evidence that its side was given too little room, so the target size `p` of T1 moves toward it:
up on a B1 hit (recency is winning), down on a B2 hit (frequency is winning). A one-time scan only
ever fills T1, so it cannot flush the hot keys in T2; that is the scan resistance LRU lacks.

The paper's REPLACE runs inside the miss; here the owner calls `pop_victim` before `insert`, so the
victim is chosen without knowing the incoming key, and the paper's tie-break (evict from T1 when
|T1| == p and the new key is in B2) is dropped. The owner's `can_evict` predicate also constrains
REPLACE: in the block cache a block pinned by a running request, or one whose child block is still
cached, may not leave. REPLACE therefore takes the least recently used *evictable* key of the list it
prefers and, when that list has none, falls back to the other list. Either way the victim becomes a
ghost on its own side, so the learning signal stays truthful. Ghost lists are trimmed after every
insert to the paper's bounds, |T1| + |B1| <= c and |T1| + |T2| + |B1| + |B2| <= 2c, which hold as
long as the owner keeps at most `capacity` keys resident.
"""

from __future__ import annotations

from collections import OrderedDict

from bulk.kv.policies.base import CanEvict, Key, always

# Every list is an OrderedDict used as an ordered set: LRU end first, MRU end last.
_List = OrderedDict[Key, None]


class ARCPolicy:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._t1: _List = OrderedDict()
        self._t2: _List = OrderedDict()
        self._b1: _List = OrderedDict()
        self._b2: _List = OrderedDict()
        self._p = 0.0  # target size of T1; fractional because the paper's steps are ratios

    @property
    def p(self) -> float:
        return self._p

    def list_sizes(self) -> tuple[int, int, int, int]:
        """(|T1|, |T2|, |B1|, |B2|), for tests and stats."""
        return len(self._t1), len(self._t2), len(self._b1), len(self._b2)

    def __contains__(self, key: Key) -> bool:
        return key in self._t1 or key in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def insert(self, key: Key) -> None:
        if key in self._b1:
            # Evicted from T1 too early: give T1 more room. The step is larger when B1 is the
            # smaller ghost list, i.e. when this hit is the rarer and so more telling signal.
            self._p = min(float(self.capacity), self._p + max(1.0, len(self._b2) / len(self._b1)))
            del self._b1[key]
            self._t2[key] = None  # second sighting within the window: frequent now
        elif key in self._b2:
            self._p = max(0.0, self._p - max(1.0, len(self._b1) / len(self._b2)))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
            self._trim_ghosts()  # only a brand-new key grows the directory

    def touch(self, key: Key) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        else:
            self._t2.move_to_end(key)

    def pop_victim(self, can_evict: CanEvict = always) -> Key | None:
        prefer_t1 = bool(self._t1) and (len(self._t1) > self._p or not self._t2)
        sides = [(self._t1, self._b1), (self._t2, self._b2)]
        if not prefer_t1:
            sides.reverse()
        for resident, ghost in sides:
            for key in resident:
                if can_evict(key):
                    del resident[key]
                    ghost[key] = None
                    return key
        return None

    def discard(self, key: Key) -> None:
        # Not an eviction, so no ghost: a hit on it later should not move `p`.
        self._t1.pop(key, None)
        self._t2.pop(key, None)

    def _trim_ghosts(self) -> None:
        c = self.capacity
        while self._b1 and len(self._t1) + len(self._b1) > c:
            self._b1.popitem(last=False)
        while len(self) + len(self._b1) + len(self._b2) > 2 * c and (self._b1 or self._b2):
            # B2 first: L1 is already within c, so any excess is on the L2 side unless B2 is empty.
            (self._b2 or self._b1).popitem(last=False)
