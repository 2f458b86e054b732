"""W-TinyLFU with ghost-driven window sizing: the policy behind `CacheStrategy.ADAPTIVE`.

Layout (after G. Einziger, R. Friedman and B. Manes, "TinyLFU: A Highly Efficient Cache Admission
Policy", ACM Transactions on Storage 2017, and Caffeine's W-TinyLFU):

* a *window*, an LRU that every new key enters;
* a *main* cache, a segmented LRU: `probation` (admitted, not yet hit there) and `protected` (hit in
  main; at most `protected` of main's room, its LRU is demoted back to probation);
* a *frequency table* counting every access to every recently seen key, resident or not. Exact
  counts in a dict, aged like TinyLFU's reset: every `period` x capacity accesses all counts are
  halved and zeros dropped. So the table's total count stays below 2 x period x capacity, and so does
  its size. Exact counts are used rather than a count-min sketch because a sketch's row hashing would
  cost more per access, in pure Python, than the whole LRU path.

Admission. The owner calls `pop_victim` before it inserts the new key, so the newcomer cannot be
compared with the victim at that moment. Instead, when the window is at its target size, the window's
LRU key (the *candidate*) competes with main's victim (probation's LRU, else protected's): the one
with the higher count stays (the candidate moves to probation), the other leaves; ties keep main's key.
A one-time scan or a key seen once never displaces a key with history (zipf-scan, loop: LRU, LFU and
ARC all score 0 on the loop, TinyLFU keeps a stable part of it), and counts kept for evicted keys let
a truly popular key win its way back in (Zipf traces, where this beats in-cache LFU).

Window sizing. A fixed 1 % window loses to LRU when popularity drifts (moving-hot-set) and on the
KV-prefix sessions, where a block is reused a few dozen requests after it is written. Caffeine tunes
the window by hill climbing on the hit ratio; here, as in ARC (N. Megiddo and D. S. Modha, "ARC: A
Self-Tuning, Low Overhead Replacement Cache", USENIX FAST 2003), two ghost lists of keys only, each
at most `capacity` long, give a faster and less noisy signal: a miss on a key the window evicted
(a rejected candidate) means the window was too small, and grows it; a miss on a key main evicted
shrinks it. Steps are ARC's ratio steps times `gain`. The window ranges over [1, capacity - 1], so the
policy slides from TinyLFU (small window) to almost LRU (large window) as the trace asks.

Under the block cache's `can_evict` (only unpinned leaves of the chain tree may leave) the candidate is
the window's least recent *evictable* key and the victim main's least recent evictable key; when one
side has none, the other side's key leaves without a contest, and None comes back only when no
resident key may leave. A block's count is never above its parent's (a child is reached only through
its parent), so the frequency contest naturally keeps shallow, shared blocks (system prompts) and
gives up deep session tails first. The hit path is one dict increment and one or two OrderedDict moves.
"""

from __future__ import annotations

from collections import OrderedDict

from bulk.kv.policies.base import CanEvict, Key, always

# Every list is an OrderedDict used as an ordered set: LRU end first, MRU end last.
_List = OrderedDict[Key, None]


class AdaptivePolicy:
    def __init__(
        self,
        capacity: int,
        window: float = 0.01,
        protected: float = 0.8,
        period: int = 10,
        gain: float = 4.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._window: _List = OrderedDict()
        self._probation: _List = OrderedDict()
        self._protected: _List = OrderedDict()
        self._wghost: _List = OrderedDict()  # keys the window evicted (rejected candidates)
        self._mghost: _List = OrderedDict()  # keys main evicted
        self._freq: dict[Key, int] = {}
        self._share = protected
        self._gain = gain
        self._period = period * capacity
        self._ops = 0
        self._wt = 0.0
        self._w_target = self._p_target = 0
        self._resize(max(1.0, capacity * window))

    @property
    def window_target(self) -> int:
        return self._w_target

    def sizes(self) -> dict[str, int]:
        """Lengths of every structure, for tests and stats."""
        return {
            "window": len(self._window),
            "probation": len(self._probation),
            "protected": len(self._protected),
            "window_ghost": len(self._wghost),
            "main_ghost": len(self._mghost),
            "freq": len(self._freq),
        }

    def __contains__(self, key: Key) -> bool:
        return key in self._window or key in self._probation or key in self._protected

    def __len__(self) -> int:
        return len(self._window) + len(self._probation) + len(self._protected)

    def insert(self, key: Key) -> None:
        freq = self._freq
        freq[key] = freq.get(key, 0) + 1
        if key in self._wghost:
            del self._wghost[key]
            self._resize(self._gain * max(1.0, len(self._mghost) / (len(self._wghost) + 1)))
        elif key in self._mghost:
            del self._mghost[key]
            self._resize(-self._gain * max(1.0, len(self._wghost) / (len(self._mghost) + 1)))
        window = self._window
        window[key] = None
        main_len = len(self._probation) + len(self._protected)
        if len(window) > self._w_target and main_len < self.capacity - self._w_target:
            moved, _ = window.popitem(last=False)  # main has room: admit without a contest
            self._probation[moved] = None
        self._ops += 1
        if self._ops >= self._period:
            self._age()

    def touch(self, key: Key) -> None:
        freq = self._freq
        freq[key] = freq.get(key, 0) + 1
        if key in self._window:
            self._window.move_to_end(key)
        elif key in self._protected:
            self._protected.move_to_end(key)
        else:
            del self._probation[key]
            self._protected[key] = None
            if len(self._protected) > self._p_target:
                demoted, _ = self._protected.popitem(last=False)
                self._probation[demoted] = None
        self._ops += 1
        if self._ops >= self._period:
            self._age()

    def pop_victim(self, can_evict: CanEvict = always) -> Key | None:
        if can_evict is always:  # fast path: the LRU end of each list, no predicate calls
            cand = next(iter(self._window), None)
            victim = next(iter(self._probation or self._protected), None)
        else:
            cand = next((k for k in self._window if can_evict(k)), None)
            victim = next((k for k in self._probation if can_evict(k)), None)
            if victim is None:
                victim = next((k for k in self._protected if can_evict(k)), None)
        if victim is None:
            if cand is not None:
                del self._window[cand]
                self._remember(self._wghost, cand)
            return cand
        if cand is not None and len(self._window) >= self._w_target:
            # The window is full (the incoming key will join it): its LRU must earn a place in main.
            freq = self._freq
            if freq.get(cand, 0) <= freq.get(victim, 0):
                del self._window[cand]
                self._remember(self._wghost, cand)
                return cand
            del self._window[cand]
            self._probation[cand] = None
        if victim in self._probation:
            del self._probation[victim]
        else:
            del self._protected[victim]
        self._remember(self._mghost, victim)
        return victim

    def discard(self, key: Key) -> None:
        # Not an eviction, so no ghost: a later miss on it should not move the window.
        self._window.pop(key, None)
        self._probation.pop(key, None)
        self._protected.pop(key, None)

    def _remember(self, ghost: _List, key: Key) -> None:
        ghost[key] = None
        if len(ghost) > self.capacity:
            ghost.popitem(last=False)

    def _resize(self, amount: float) -> None:
        self._wt = min(max(1.0, self.capacity - 1.0), max(1.0, self._wt + amount))
        self._w_target = int(self._wt)
        self._p_target = int((self.capacity - self._w_target) * self._share)

    def _age(self) -> None:
        self._freq = {k: v >> 1 for k, v in self._freq.items() if v > 1}
        self._ops = 0
