"""The policy behind `CacheStrategy.ADAPTIVE`: LRU while LRU is enough, then W-TinyLFU with a
ghost-driven window; and a mode of its own for the prefix block cache.

W-TinyLFU (G. Einziger, R. Friedman and B. Manes, "TinyLFU: A Highly Efficient Cache Admission
Policy", ACM Transactions on Storage 2017, and Caffeine): every new key enters a *window* (an LRU);
*main* is a segmented LRU, `probation` (admitted, not yet hit there) and `protected` (hit in main, at
most `protected` of main's room), so a hot key outlives a burst of admissions. A *frequency table*
counts every access to every recently seen key, resident or not, in a dict (a count-min sketch's
hashing costs more in pure Python than the whole LRU path); every `period` x capacity *misses* all
counts are halved, counts of 32 and more cap at 15, zeros go (aging by misses keeps the hit path free
of bookkeeping). Admission: the owner calls `pop_victim` before it inserts, so when the window is at
its target the window's LRU key (the *candidate*) competes with main's victim; the higher count stays,
ties keep main's key. A one-time scan never displaces a key with history, and counts kept for evicted
keys let a popular key win its way back in.

Window sizing, as in ARC (N. Megiddo and D. S. Modha, USENIX FAST 2003) rather than Caffeine's hill
climber: a miss on a key the window rejected grows the window by `gain`, a miss on a key main evicted
shrinks it; a ghost counts while fewer than `horizon` x capacity evictions of its own kind followed
it (it stores its eviction's number, so no list is trimmed on the hot path). The window ranges over
[1, capacity - 1]. A ghost hit moves it by `gain` times the number of ghost hits in a row that asked
the same way (at most `momentum`), Rprop's step rule (M. Riedmiller and H. Braun, ICNN 1993): after a
shift in popularity the window ghosts agree many times over and the window opens in a few dozen
misses; on a stationary trace the two kinds alternate and steps stay at `gain`.

LRU mode (flat keys). The policy starts as exactly LRU: the window is the whole cache, main is empty.
LRU is the best online policy when the keys it evicts do not come back with a history (a hot set that
fits plus traffic that does not repeat: moving-hot-set at 1000 keys, where LRU is within 2.3 points of
Bélády and any filter only pays for exploring), and a filter pays when LRU evicts keys used before
that then return. So every half cache of misses a verdict counts the misses on keys LRU evicted fewer
than 1.25 caches of evictions ago and accessed at least twice before; when they are more than
`lru_exit` (6 %) of the verdict's misses, the policy leaves LRU mode for good: the window's older part
becomes probation, the window restarts at `window` (1 %), and LRU's ghosts, which would all ask for a
larger window, are dropped. ARC likewise starts with all its room on the recency side (p = 0).
`lru_exit=None` starts as W-TinyLFU.

Block-cache mode (`BlockAdaptivePolicy`, which the block manager gets from `make_policy(chains=True)`),
where only
unpinned leaves of the chain tree may leave (`can_evict`) and the score is tokens reused:

* the window starts at its largest (almost LRU) and moves by `block_gain`: a returning session
  re-touches its whole chain, so a deep block's count only says how many turns ago it was written,
  and a small window would drop live session tails;
* one vote per run of misses: a request that finds its chain cut re-inserts every block after the
  cut, a burst of ghost hits of one kind, but only the first missing block says something about
  token hits (a later block saves prefill only if every block before it is kept). A `touch` starts
  a new run;
* main's victim is the lowest count among main's first `scan` evictable keys, probation's oldest
  first, then protected's. With a small window the blocks a request adds are pinned by it, so most
  evictions find no evictable candidate and main's choice is the policy: among idle session tails
  and the last blocks of system prompts no live session hangs under, the count keeps a rarely used
  system prompt (a block's count is never above its parent's) as LFU does;
* counts age every `block_period` x capacity misses: a prompt's count must outlive the gaps between
  its sessions.

Figures, and what was tried and lost: `docs/adaptive-policy.md`. Cost: a hit is a count increment and
an OrderedDict move; a miss adds two ghost lookups and one ghost write to the list work.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict

from bulk.kv.policies.base import CanEvict, Key, always

# LRU mode: a verdict every half cache of misses; an LRU victim "comes back with a history" within
# 1.25 caches of evictions, having been accessed at least twice before.
_RETURN_HORIZON = 1.25
_RETURN_COUNT = 2


def _verdict_period(capacity: int) -> int:
    return max(1, capacity // 2)


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
        lru_exit: float | None = 0.06,
    ) -> None:
        self._setup(capacity, window, protected, horizon, lru_exit, chains=False)
        self._gain, self._momentum, self._scan = gain, max(1, momentum), 1
        self._period = self._left = period * capacity  # misses until the next aging
        if lru_exit:  # LRU mode (the window is the whole cache) until keys with a history return
            self._w_max = float(capacity)
            self._check = _verdict_period(capacity)
            self._resize(self._w_max)
        else:
            self._resize(self._window_start)

    def _setup(
        self,
        capacity: int,
        window: float,
        protected: float,
        horizon: float,
        lru_exit: float | None,
        chains: bool,
    ) -> None:
        """The state both modes share; each mode's `__init__` then sets its steps and window."""
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
        self._streak = 0  # consecutive ghost hits asking the same way: > 0 grow, < 0 shrink
        self._wt = 0.0
        self._w_target = self._p_target = 0
        self._chains = chains
        self._voted = False  # block-cache mode: a ghost has voted in this run of misses already
        # At most 29 attributes: past 30, CPython's attribute access slows (docs/adaptive-policy.md).
        self._check, self._score = 0, 0.0  # LRU mode: misses to the next verdict, and the evidence
        self._exit_weight = 1.0 / lru_exit if lru_exit else 0.0
        self._window_start = max(1.0, capacity * window)
        self._w_max = max(1.0, capacity - 1.0)

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
            age = self._wn - wghost.pop(key)
            if self._check and age < _RETURN_HORIZON * self.capacity and self._freq[key] > _RETURN_COUNT:
                self._score += self._exit_weight  # LRU evicted a key seen twice before, it is back
            if age < self._live and not self._voted:
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
        if self._check:  # LRU mode: every miss is evidence for staying, unless it is a return
            self._score -= 1
            self._check -= 1
            if not self._check:
                self._lru_verdict()

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

    def _lru_verdict(self) -> None:
        if self._score <= 0:  # LRU's victims rarely come back with a history: stay LRU
            self._check, self._score = _verdict_period(self.capacity), 0
            return
        # Leave for good: main takes the window's older part, the window starts small, and the
        # ghosts LRU left (which would all ask for a larger window) are forgotten.
        self._check = self._score = self._streak = 0
        self._w_max = max(1.0, self.capacity - 1.0)
        self._resize(self._window_start - self._wt)
        self._wghost.clear()
        self._mghost.clear()
        window, probation, where = self._window, self._probation, self._where
        while len(window) > self._w_target:
            moved, _ = window.popitem(last=False)
            probation[moved] = None
            where[moved] = probation

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


class BlockAdaptivePolicy(AdaptivePolicy):
    """ADAPTIVE in the prefix block cache (the module docstring's block-cache mode): the window starts
    almost LRU and moves by `block_gain` with no momentum, main's victim is the lowest count among its
    first `scan` evictable keys, counts age every `block_period` x capacity misses, and one run of
    misses votes once."""

    def __init__(
        self,
        capacity: int,
        window: float = 0.01,
        protected: float = 0.8,
        horizon: float = 0.25,
        block_gain: float = 4.0,
        scan: int = 8,
        block_period: int = 15,
    ) -> None:
        self._setup(capacity, window, protected, horizon, None, chains=True)
        self._gain, self._momentum, self._scan = block_gain, 1, max(1, scan)
        self._period = self._left = block_period * capacity
        self._resize(self._w_max)

    def touch(self, key: Key) -> None:
        # A hit ends the current run of misses, so the next miss may vote again.
        self._voted = False
        AdaptivePolicy.touch(self, key)
