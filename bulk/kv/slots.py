"""Bookkeeping of the running requests' KV working memory: which token ranges of the pool are taken.

Each running request gets one contiguous range of the KV pool (`bulk.models.kv_pool`), sized once
for its prompt and its answer, so its attention reads one contiguous run of keys and values and a
decode step writes one position per request. This allocator only hands out and takes back ranges
(first fit, neighbours merged on free); it knows nothing of tensors, like the block manager.

Contiguous ranges can leave free memory in pieces too small for the next request; the scheduler
then waits for a running request to finish rather than moving anyone's KV. Requests finish within
`max_new_tokens` steps, so a waiting request is always admitted eventually.
"""

from __future__ import annotations

import bisect


class SlotAllocator:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (start, length), sorted by start
        self._taken: dict[int, int] = {}  # start -> length
        self.used = 0

    def allocate(self, length: int) -> int | None:
        """The start of a free range of `length` tokens, now taken; None when no free range is long
        enough (the lowest one that fits is taken, so a lone request always starts at 0)."""
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        for index, (start, free) in enumerate(self._free):
            if free >= length:
                if free == length:
                    del self._free[index]
                else:
                    self._free[index] = (start + length, free - length)
                self._taken[start] = length
                self.used += length
                return start
        return None

    def free(self, start: int) -> None:
        """Give back the range that begins at `start`; KeyError if it is not taken."""
        length = self._taken.pop(start)
        self.used -= length
        index = bisect.bisect(self._free, (start, length))
        end = start + length
        # Merge with the following free range, then with the preceding one.
        if index < len(self._free) and self._free[index][0] == end:
            end += self._free.pop(index)[1]
        if index > 0 and sum(self._free[index - 1]) == start:
            start = self._free[index - 1][0]
            self._free[index - 1] = (start, end - start)
        else:
            self._free.insert(index, (start, end - start))

    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)
