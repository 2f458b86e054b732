"""The tiers below memory, fastest first: local disk, Redis, PostgreSQL (each optional).

Reads happen on the request path: the chain of blocks the memory tier lacks is asked of each tier in
turn, one batched call per tier, and the first missing, corrupt or foreign block ends the usable
prefix (a child is useless without its parent). A block found in a slower tier is also written to
the faster ones above it.

Writes never happen on the request path. New blocks go to a bounded queue that one writer thread
drains: it serializes each block once and writes it to every tier (write-through, so a restart or a
second replica finds it at once). A block whose write failed (a tier down) stays on an "unwritten"
list: when idle, the writer retries those still in memory (read back through `source`), and a block
that memory evicts before that is held, up to `HELD_BYTES`, until a retry succeeds (write-back).
When the queue is full a write is dropped and counted: the block is still in memory, and serving
never waits on storage.

The writer thread also keeps each tier's budget true to its backend (`BudgetedStore.resync`): soon
after start, every `resync_seconds`, and after a tier comes back from a failure.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from bulk.errors import CorruptBlockError
from bulk.storage.guard import GuardedStore
from bulk.storage.serialization import BlockRecord, dumps, loads

log = logging.getLogger(__name__)

WRITE_QUEUE_BLOCKS = 4096
HELD_BYTES = 64 << 20  # evicted blocks kept for a tier that is down
_WRITE_BATCH = 64
_STOP = object()

# One queued write: the block's key, its record (or already serialized bytes), the tier indices.
_Write = tuple[bytes, BlockRecord | bytes, tuple[int, ...]]


class LowerTiers:
    def __init__(
        self,
        tiers: Sequence[GuardedStore],
        secret: bytes | None,
        retry_seconds: float = 1.0,
        resync_seconds: float = 60.0,
    ) -> None:
        self.tiers = list(tiers)
        self.secret = secret
        self.retry_seconds = retry_seconds
        self.resync_seconds = resync_seconds
        # The first resync comes at once: keys a backend listed at start get their sizes.
        self._next_resync = time.monotonic()
        self._last_resync = [0.0] * len(self.tiers)
        self.dropped_writes = 0
        self._closed = False
        # Blocks not yet in every tier (queued, or their write failed), in insertion order, and the
        # evicted ones among them, held with their records.
        self._unwritten: OrderedDict[bytes, None] = OrderedDict()
        self._held: OrderedDict[bytes, BlockRecord] = OrderedDict()
        self._held_bytes = 0
        self.source: Callable[[bytes], BlockRecord | None] = lambda _key: None
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=WRITE_QUEUE_BLOCKS)
        self._writer = threading.Thread(target=self._write_loop, name="bul-tier-writer", daemon=True)
        self._writer.start()

    # ---- reads (request path) --------------------------------------------------------------

    def fetch_chain(
        self, keys: Sequence[bytes], accept: Callable[[int, BlockRecord], bool]
    ) -> list[BlockRecord]:
        """The longest run of `keys`, from the first, that the tiers hold intact. `accept(i, record)`
        checks block i's tokens and shape against what the request expects."""
        found: list[BlockRecord] = []
        for level, tier in enumerate(self.tiers):
            if len(found) == len(keys):
                break
            start = len(found)
            wanted = keys[start:]
            for key, data in zip(wanted, tier.get_many(wanted), strict=True):
                record = self._decode(tier, key, data)
                if record is None or not accept(len(found), record):
                    if record is not None:
                        tier.count("corrupt")  # a well-formed block for other tokens or shape
                    break
                found.append(record)
            if len(found) > start:
                tier.count("hits", len(found) - start)
                if level:  # promote to the faster lower tiers
                    self._enqueue(
                        [(k, r, tuple(range(level))) for k, r in zip(wanted, found[start:], strict=False)]
                    )
            if len(found) < len(keys):
                tier.count("misses")
        return found

    def _decode(self, tier: GuardedStore, key: bytes, data: bytes | None) -> BlockRecord | None:
        if data is None:
            return None
        try:
            return loads(key, data, self.secret)
        except CorruptBlockError as exc:
            log.warning("dropping a corrupt block %s from the %s tier: %s", key.hex()[:16], tier.name, exc)
            tier.count("corrupt")
            tier.delete(key)
            return None

    # ---- writes (writer thread) ------------------------------------------------------------

    def write(self, items: Sequence[tuple[bytes, BlockRecord]]) -> None:
        """Queue new blocks for every tier; returns at once."""
        everywhere = tuple(range(len(self.tiers)))
        self._enqueue([(key, record, everywhere) for key, record in items])

    def evicted(self, key: bytes, record: BlockRecord | None) -> None:
        """The memory tier dropped `key`: hold it for a retry if no tier has it yet."""
        with self._lock:
            if key not in self._unwritten:
                return
            if record is None:
                self._unwritten.pop(key, None)
                return
            self._held[key] = record
            self._held_bytes += record.nbytes
            while self._held_bytes > HELD_BYTES:
                old_key, old = self._held.popitem(last=False)
                self._held_bytes -= old.nbytes
                self._unwritten.pop(old_key, None)
                self.dropped_writes += 1

    def _enqueue(self, writes: list[_Write]) -> None:
        for write in writes:
            with self._lock:
                self._unwritten[write[0]] = None
            try:
                self._queue.put_nowait(write)
            except queue.Full:
                with self._lock:
                    self.dropped_writes += 1

    def _write_loop(self) -> None:
        while True:
            self._resync_when_due()  # here too, not only when idle: a busy writer is never idle
            try:
                batch = [self._queue.get(timeout=min(self.retry_seconds, self.resync_seconds))]
            except queue.Empty:
                self._retry_unwritten()
                continue
            while len(batch) < _WRITE_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                stop = any(item is _STOP for item in batch)
                self._write_batch([item for item in batch if item is not _STOP])
            except Exception:
                log.exception("tier writer failed on a batch of %d blocks", len(batch))
                stop = False
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return

    def _resync_when_due(self) -> None:
        now = time.monotonic()
        periodic = now >= self._next_resync
        if periodic:
            self._next_resync = now + self.resync_seconds
        for level, tier in enumerate(self.tiers):
            # A reconnect asks for one at once, but no more often than retries: a pool that opens
            # connections under load must not turn resyncs into a steady cost.
            if periodic or (tier.resync_due and now - self._last_resync[level] >= self.retry_seconds):
                self._last_resync[level] = now
                tier.resync()  # its guard counts and logs a failure, as for any tier call

    def _retry_unwritten(self) -> None:
        """Idle: write again, to every tier, blocks whose earlier write failed."""
        with self._lock:
            keys = list(self._unwritten)[:_WRITE_BATCH]
        everywhere = tuple(range(len(self.tiers)))
        batch: list[_Write] = []
        for key in keys:
            record = self._held.get(key) or self.source(key)
            if record is None:  # gone from memory and not held: nothing left to write
                with self._lock:
                    self._unwritten.pop(key, None)
            else:
                batch.append((key, record, everywhere))
        try:
            self._write_batch(batch)
        except Exception:
            log.exception("tier writer failed retrying %d blocks", len(batch))

    def _write_batch(self, batch: list[_Write]) -> None:
        per_tier: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, value, levels in batch:
            data = value if isinstance(value, bytes) else dumps(key, value, self.secret)
            for level in levels:
                per_tier.setdefault(level, []).append((key, data))
        failed: set[bytes] = set()
        for level, items in per_tier.items():
            if not self.tiers[level].put_many(items):
                failed.update(key for key, _ in items)
        with self._lock:
            for key, _, _ in batch:
                if key in failed:
                    continue
                self._unwritten.pop(key, None)
                held = self._held.pop(key, None)
                if held is not None:
                    self._held_bytes -= held.nbytes

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is done (or `timeout` seconds); True when drained."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued writes (up to `timeout` seconds), stop the writer, close every tier. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        self._queue.put(_STOP)
        self._writer.join(timeout)
        for tier in self.tiers:
            tier.close()

    def clear(self) -> None:
        self.flush(10.0)
        for tier in self.tiers:
            tier.clear()

    def stats(self) -> dict[str, dict[str, Any]]:
        return {tier.name: tier.stats() for tier in self.tiers}
