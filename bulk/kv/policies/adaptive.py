"""W-TinyLFU with ghost-driven window sizing: the policy behind `CacheStrategy.ADAPTIVE`.

Layout (after G. Einziger, R. Friedman and B. Manes, "TinyLFU: A Highly Efficient Cache Admission
Policy", ACM Transactions on Storage 2017, and Caffeine's W-TinyLFU):

* a *window*, an LRU that every new key enters;
* a *main* cache, a segmented LRU: `probation` (admitted, not yet hit there) and `protected` (hit in
  main; at most `protected` of main's room, its LRU is demoted back to probation). A single main LRU
  was tried and loses 2-4 points on every Zipf trace: probation is what lets a hot key outlive a
  burst of admissions;
* a *frequency table* counting every access to every recently seen key, resident or not. Exact
  counts in a dict, aged like TinyLFU's reset: every `period` x capacity *misses* all counts are
  halved, counts of 32 and more cap at 15 (as a 4-bit counter would), and zeros are dropped. Aging
  by misses rather than accesses keeps the hit path free of bookkeeping and scores better (hit-heavy
  phases keep their history). So a key not resident stays in the table at most ~5 periods after its
  last miss or eviction. Exact counts, because a count-min sketch's row hashing would cost more per
  access, in pure Python, than the whole LRU path.

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
Self-Tuning, Low Overhead Replacement Cache", USENIX FAST 2003), two ghost maps of keys only give a
faster and less noisy signal: a miss on a key the window evicted (a rejected candidate) means the
window was too small, and grows it by `gain`; a miss on a key main evicted shrinks it. A ghost counts
only while it is recent: fewer than `horizon` x capacity evictions of its own kind since it left
(each ghost stores its eviction's number, so the hot path never trims a list; expired ghosts go at
each aging). A quarter of the cache scored best of 0.05-4 x capacity: against a horizon of one
cache it halves the gap to LFU on the KV-prefix trace at 256 blocks (mean over the benchmark 0.554
against 0.551); shorter ones lose on moving-hot-set and the larger KV caches. The window ranges over
[1, capacity - 1], so the policy slides from TinyLFU (small window) to almost LRU (large window).

Step momentum. A ghost hit moves the window by `gain` times the number of ghost hits in a row that
asked the same way (at most `momentum`, 8); a hit asking the other way restarts the count at one.
This is the step-size rule of adaptive optimisers (Rprop, M. Riedmiller and H. Braun, ICNN 1993) and
of Caffeine's hill climber, whose step restarts large when the hit ratio moves: when popularity shifts
(moving-hot-set's new hot set) the window ghosts agree many times over and the window opens in a few
dozen misses instead of a few hundred, while on a stationary Zipf trace the two kinds of ghost hits
alternate and the steps stay at `gain`. Moving-hot-set at 1000 keys goes from -0.33 to -0.04 points
against LRU (seed 4; seed 5: -0.55 to -0.09), 250 and 500 keys gain 1-1.6 points, the Zipf traces
lose 0.2-0.5 of their 0.4-2.2 point lead. A larger fixed gain (8, 16) or a step that doubles per
agreeing hit (capped at 2-6 % of the cache) lose more on Zipf at 100 keys for the same gain on
moving-hot-set; aging by accesses instead of misses (Caffeine's sample period) loses everywhere.

Under the block cache's `can_evict` (only unpinned leaves of the chain tree may leave) the candidate is
the window's least recent *evictable* key and the victim main's least recent evictable key; when one
side has none, the other side's key leaves without a contest, and None comes back only when no
resident key may leave. A block's count is never above its parent's (a child is reached only through
its parent), so the frequency contest naturally keeps shallow, shared blocks (system prompts) and
gives up deep session tails first. Weighting the contest by a block's depth in its chain (ties to the
shallower block, or counts divided by depth) was tried and scores lower on the KV-prefix trace.

Block-cache mode (`chains=True`, which the block manager asks for through `make_policy`). There a returning
session re-touches its whole chain on every request, so a deep block's count only says how many turns
ago it was written: a finished session's tail outscores a live session's newest block, and a small
window drops live tails (on the KV-prefix trace a fixed 50 % window loses 20-30 points to LRU at 1024
and 4096 blocks). So in this mode the window restarts at its largest (almost LRU) and moves by
`block_gain` per ghost hit, shrinking only as main's ghosts ask: against LRU at 1024 and 4096 blocks
this goes from -0.23 and -0.50 points to -0.00 and -0.02.

Main's victim in block-cache mode. With a small window every block a request adds is pinned by
that request, so most evictions find no evictable candidate in the window and main's victim leaves
without a contest: main's choice is the policy. It is the lowest-count key among main's first `scan`
(8) evictable keys, probation's oldest first and then protected's, rather than strictly the oldest.
Only leaves may leave, so these are idle session tails and the last blocks of system prompts that no
live session hangs under; the count tells them apart, and letting protected keys into the comparison
is what keeps a rarely used system prompt (one request in twenty) cached as LFU does: on the KV-prefix
trace at 256 blocks the loss to LFU was in exactly those prompts. Counts are halved every 15 x capacity
misses here, not 10: a prompt's count must outlive the gaps between its sessions. KV-prefix at
256 / 1024 / 4096 blocks, against max(LRU, LFU), seeds 5 to 9: from -0.44 / +0.02 / 0, +1.85 / +0.11 /
0, +0.76 / +0.12 / 0, +0.96 / -0.04 / 0, +1.16 / -0.01 / 0 to +0.38 / +0.00 / 0, +1.83 / +0.09 / 0,
+1.00 / +0.16 / 0, +1.35 / +0.05 / 0, +1.56 / +0.01 / 0 (scan 4-16 and periods 12-15 all pass the
15 cells). Flat traces never pass a predicate and are unaffected.

One vote per run of misses (block-cache mode). A request that finds its chain cut re-inserts every
block after the cut, and those blocks left the cache together, so one request brings a burst of tens
of ghost hits of one kind: the window swung by a quarter of a 256-block cache on a single returning
session. But only the first missing block says something about token hits (a later block saves
prefill only if every block before it is kept too, see `simulate_prefix`). So in this mode only the
first live ghost hit of each run of misses moves the window (a `touch`, i.e. a hit, starts a new run;
the other ghosts of the run are still consumed), with `block_gain` 4 and no momentum (a run already
counts once). KV-prefix, seed 5: 256 blocks 35.41 -> 36.11 % (LFU 36.55), 1024 64.00 -> 63.95
(LRU 63.93), 4096 ties LRU; seed 6: 29.72 -> 30.01 (LFU 28.16), 59.84 -> 59.97 (LRU 59.87), ties.

What was tried and lost, with the figures, is kept in `docs/adaptive-policy.md`.

Cost. One dict maps each resident key to its list, so membership is one lookup; a hit is a count
increment and one OrderedDict move (a promotion, and maybe a demotion, on a probation hit), with
no aging counter; a miss adds two ghost lookups and one ghost write to the list work.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict

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
        horizon: float = 0.25,
        momentum: int = 8,
        block_gain: float = 4.0,
        scan: int = 8,
        block_period: int = 15,
        chains: bool = False,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._window: _List = OrderedDict()
        self._probation: _List = OrderedDict()
        self._protected: _List = OrderedDict()
        self._where: dict[Key, _List] = {}  # resident key -> the list it is in
        self._wghost: dict[Key, int] = {}  # key the window evicted -> that eviction's number
        self._mghost: dict[Key, int] = {}  # key main evicted -> that eviction's number
        self._wn = self._mn = 0  # evictions so far from the window, from main
        self._live = max(1, int(horizon * capacity))  # a ghost counts for this many evictions
        self._freq: defaultdict[Key, int] = defaultdict(int)
        self._share = protected
        self._gain = gain
        self._momentum = max(1, momentum)
        self._streak = 0  # consecutive ghost hits asking the same way: > 0 grow, < 0 shrink
        self._block_gain = block_gain
        self._block_scan = max(1, scan)
        self._block_period = block_period * capacity
        self._scan = 1  # main's victim: the lowest count of this many evictable keys
        self._period = period * capacity
        self._left = self._period  # misses until the next aging
        self._wt = 0.0
        self._w_max = max(1.0, capacity - 1.0)
        self._w_target = self._p_target = 0
        self._resize(max(1.0, capacity * window))
        self._chains = chains
        self._voted = False  # block-cache mode: a ghost has voted in this run of misses already
        if chains:
            self._to_chains()

    @property
    def window_target(self) -> int:
        return self._w_target

    def sizes(self) -> dict[str, int]:
        """Lengths of every structure (live ghosts only), for tests and stats."""
        return {
            "window": len(self._window),
            "probation": len(self._probation),
            "protected": len(self._protected),
            "window_ghost": sum(self._wn - n < self._live for n in self._wghost.values()),
            "main_ghost": sum(self._mn - n < self._live for n in self._mghost.values()),
            "ghost_entries": len(self._wghost) + len(self._mghost),
            "freq": len(self._freq),
        }

    def __contains__(self, key: Key) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def insert(self, key: Key) -> None:
        self._freq[key] += 1
        wghost, mghost = self._wghost, self._mghost
        if key in wghost:  # the window rejected it too early: grow the window
            if self._wn - wghost.pop(key) < self._live and not self._voted:
                self._voted = self._chains
                if self._wt < self._w_max:
                    streak = self._streak = self._streak + 1 if self._streak > 0 else 1
                    self._resize(self._gain * min(streak, self._momentum))
        elif key in mghost and self._mn - mghost.pop(key) < self._live and not self._voted:
            self._voted = self._chains  # main evicted it too early: shrink the window
            if self._wt > 1.0:
                streak = self._streak = self._streak - 1 if self._streak < 0 else -1
                self._resize(-self._gain * min(-streak, self._momentum))
        window, where = self._window, self._where
        window[key] = None
        where[key] = window
        if len(window) > self._w_target:
            # Over target: the window's LRU joins main. When the cache is full, `pop_victim` has
            # already made it win its place against main's victim.
            moved, _ = window.popitem(last=False)
            probation = self._probation
            probation[moved] = None
            where[moved] = probation
        self._left -= 1
        if not self._left:
            self._age()

    def touch(self, key: Key) -> None:
        self._freq[key] += 1
        where = self._where
        lst = where[key]
        if lst is self._probation:  # a hit in main: protect it
            del lst[key]
            protected = self._protected
            protected[key] = None
            where[key] = protected
            if len(protected) > self._p_target:
                demoted, _ = protected.popitem(last=False)
                lst[demoted] = None
                where[demoted] = lst
        else:
            lst.move_to_end(key)

    def _touch_in_chain(self, key: Key) -> None:
        # Block-cache mode: a hit ends the current run of misses, so the next miss may vote again.
        self._voted = False
        AdaptivePolicy.touch(self, key)

    def pop_victim(self, can_evict: CanEvict = always) -> Key | None:
        window = self._window
        main = self._probation or self._protected
        cand = victim = None
        if can_evict is always:  # fast path: the LRU end of each list, no predicate calls
            for cand in window:  # noqa: B007 (the first key, without next(iter()) calls)
                break
            for victim in main:  # noqa: B007
                break
        else:
            cand = next((k for k in window if can_evict(k)), None)
            freq = self._freq
            victim, least, left = None, 0, self._scan
            # The lowest count among main's first `scan` evictable keys: probation's, oldest first,
            # then protected's. Without chains `scan` is 1: the oldest evictable key.
            for lst in (self._probation, self._protected):
                for key in lst:
                    if can_evict(key):
                        count = freq.get(key, 0)
                        if victim is None or count < least:
                            victim, least, main = key, count, lst
                        left -= 1
                        if not left:
                            break
                if not left:
                    break
        if victim is not None:
            if cand is None or len(window) < self._w_target:
                return self._evict(main, victim)
            # The window is full (the incoming key will join it): its LRU must earn a place in main.
            freq = self._freq
            if freq.get(cand, 0) > freq.get(victim, 0):
                del window[cand]
                probation = self._probation
                probation[cand] = None
                self._where[cand] = probation
                return self._evict(main, victim)
        elif cand is None:
            return None
        return self._reject(cand)

    def discard(self, key: Key) -> None:
        # Not an eviction, so no ghost: a later miss on it should not move the window.
        lst = self._where.pop(key, None)
        if lst is not None:
            del lst[key]

    def _reject(self, key: Key) -> Key:
        del self._window[key]
        del self._where[key]
        self._wn += 1
        self._wghost[key] = self._wn
        return key

    def _evict(self, lst: _List, key: Key) -> Key:
        del lst[key]
        del self._where[key]
        self._mn += 1
        self._mghost[key] = self._mn
        return key

    def _to_chains(self) -> None:
        """Block-cache mode (see the docstring): near-LRU window, its own gain, the victim scan."""
        self._gain = self._block_gain
        self._momentum = 1
        self._scan = self._block_scan
        self._period = self._left = self._block_period
        self.touch = self._touch_in_chain  # type: ignore[method-assign]
        self._resize(self._w_max - self._wt)

    def _resize(self, amount: float) -> None:
        wt = self._wt + amount
        self._wt = self._w_max if wt > self._w_max else 1.0 if wt < 1.0 else wt
        self._w_target = int(self._wt)
        self._p_target = int((self.capacity - self._w_target) * self._share)

    def _age(self) -> None:
        self._freq = defaultdict(int, {k: v >> 1 if v < 32 else 15 for k, v in self._freq.items() if v > 1})
        self._left = self._period
        wn, mn, live = self._wn, self._mn, self._live
        self._wghost = {k: n for k, n in self._wghost.items() if wn - n < live}
        self._mghost = {k: n for k, n in self._mghost.items() if mn - n < live}
