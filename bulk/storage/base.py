"""The one storage interface every KV tier implements (memory now; disk, Redis and PostgreSQL plug
in behind the same six methods). Keys are block hashes (32 bytes); values are block tensors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class BlockStore(Protocol):
    name: str

    def contains(self, key: bytes) -> bool: ...

    def get(self, key: bytes) -> torch.Tensor | None: ...

    def put(self, key: bytes, block: torch.Tensor) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...

    def get_many(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]: ...

    def put_many(self, items: Iterable[tuple[bytes, torch.Tensor]]) -> None: ...
