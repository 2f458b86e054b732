"""The local-disk tier: one file per block under `persistence_path`, so a restarted engine finds
the blocks its predecessor computed.

Each block is written to a temporary file in the same directory and renamed into place: a reader
sees the whole file or none. There is no fsync per block (it would cost more than computing the
block); a file torn by a power loss fails its integrity tag when read, and the tiered store then
deletes it. The index of what is on disk is rebuilt by listing the directory at start, oldest
first, and left-over temporary files are removed then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from bulk.errors import TierError
from bulk.storage.base import BlockStore

log = logging.getLogger(__name__)

SUFFIX = ".blk"


@contextlib.contextmanager
def _translate_errors(action: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise TierError(f"disk {action} failed: {exc}") from exc


class DiskBlockStore(BlockStore[bytes]):
    name = "disk"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._sizes: dict[bytes, int] = {}  # key -> file size, oldest first
        with _translate_errors("open"):
            self.root.mkdir(parents=True, exist_ok=True)
            self._rebuild_index()

    def _path(self, key: bytes) -> Path:
        name = key.hex()
        return self.root / name[:2] / f"{name}{SUFFIX}"

    def _rebuild_index(self) -> None:
        found: list[tuple[float, bytes, int]] = []
        for path in self.root.glob("*/*"):
            if path.suffix != SUFFIX:
                path.unlink(missing_ok=True)  # a write that never finished
                continue
            try:
                key = bytes.fromhex(path.stem)
                stat = path.stat()
            except (ValueError, OSError):
                continue
            found.append((stat.st_mtime, key, stat.st_size))
        for _, key, size in sorted(found):
            self._sizes[key] = size
        if found:
            log.info("disk tier: %d blocks found under %s", len(found), self.root)

    def keys(self) -> list[bytes]:
        """Every stored key, oldest first (the order the budget's policy learns them in)."""
        with self._lock:
            return list(self._sizes)

    @property
    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    def contains(self, key: bytes) -> bool:
        return key in self._sizes

    def get(self, key: bytes) -> bytes | None:
        if key not in self._sizes:
            return None
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._sizes.pop(key, None)
            return None
        except OSError as exc:
            raise TierError(f"disk read failed: {exc}") from exc

    def put(self, key: bytes, value: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        with _translate_errors("write"):
            path.parent.mkdir(exist_ok=True)
            try:
                tmp.write_bytes(value)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        with self._lock:
            self._sizes.pop(key, None)
            self._sizes[key] = len(value)

    def delete(self, key: bytes) -> None:
        with self._lock:
            self._sizes.pop(key, None)
        with _translate_errors("delete"):
            self._path(key).unlink(missing_ok=True)

    def clear(self) -> None:
        for key in self.keys():
            self.delete(key)

    def close(self) -> None:
        pass  # every write is complete when put returns

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            self.put(key, value)
