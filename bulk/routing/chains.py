"""A request's block-hash chain, computed outside the engine exactly as the engine computes it.

The engine names a prompt's full blocks by chained SHA-256 hashes (`bulk.kv.hashing`) of its token
ids, under a namespace of model fingerprint, block size, dtype and quantization. A router computes
the same chain for a request before any replica sees it: the request dict is parsed by the engine's
own `parse_request` under the same `BUL_*` configuration, its prompt rendered by the engine's chat
rendering (`bulk.engine.chat`), tokenized by the model's own tokenizer (loaded once: the tokenizer
alone, never the weights) and hashed under the namespace the replicas report (the fingerprint comes
from their weights). So a chain computed here names the very blocks a replica stores.

Replicas report what they hold compactly: the first 8 bytes of each block hash (`block_id`), packed
into one `bytes` value (`pack_block_ids`); 65,536 blocks (a million tokens) take 512 KiB."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterable
from typing import Any

from bulk.config import KVCacheConfig
from bulk.engine.request import GenerationRequest, parse_request
from bulk.errors import InvalidRequestError
from bulk.kv.hashing import chain_hashes
from bulk.models.tokenizer import Tokenizer
from bulk.routing.policy import RoutingKey

log = logging.getLogger(__name__)

BLOCK_ID_BYTES = 8


def block_id(digest: bytes) -> int:
    return int.from_bytes(digest[:BLOCK_ID_BYTES], "little")


def pack_block_ids(digests: Iterable[bytes]) -> bytes:
    return b"".join(bytes(d[:BLOCK_ID_BYTES]) for d in digests)


def unpack_block_ids(packed: bytes) -> frozenset[int]:
    if len(packed) % BLOCK_ID_BYTES:
        raise ValueError("a packed block-id list is a multiple of 8 bytes long")
    view = memoryview(packed)
    return frozenset(
        int.from_bytes(view[i : i + BLOCK_ID_BYTES], "little") for i in range(0, len(packed), BLOCK_ID_BYTES)
    )


def load_tokenizer(config: KVCacheConfig) -> Tokenizer:
    """The tokenizer of `config.model`, without its weights: the demo models' byte tokenizer, or the
    Hugging Face tokenizer of the model folder (a GGUF file is converted once first, as the engine
    does, into the same folder)."""
    from bulk.models.loader import load_tokenizer as load  # torch and transformers: only when called

    return load(config)


def chat_session(request: GenerationRequest) -> tuple[str | None, bool]:
    """A conversation's session key, from its opening (the turns up to its first user turn), and
    whether it binds (the conversation has earlier assistant turns: a multi-turn chat)."""
    if not request.messages:
        return None, False
    opening: list[tuple[str, ...]] = []
    for turn in request.messages:
        opening.append(turn)
        if turn[0] == "user":
            break
    digest = hashlib.sha256(json.dumps(opening, ensure_ascii=False).encode()).hexdigest()[:24]
    return f"chat:{digest}", any(turn[0] == "assistant" for turn in request.messages)


class RequestChains:
    """Routing keys of request dicts. The tokenizer loads on a thread of its own (a GGUF model may
    first be converted, which takes seconds); until it is there, keys carry no chain and the router
    balances by load alone."""

    def __init__(self, config: KVCacheConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self._tokenizer = tokenizer
        self._failed = False
        if tokenizer is None:
            threading.Thread(target=self._load, name="bul-router-tokenizer", daemon=True).start()

    def _load(self) -> None:
        try:
            self._tokenizer = load_tokenizer(self.config)
            log.info("router tokenizer for %s loaded", self.config.model)
        except Exception:
            self._failed = True
            log.exception("cannot load the tokenizer of %s: routing by load alone", self.config.model)

    @property
    def ready(self) -> bool:
        return self._tokenizer is not None

    def token_ids(self, request: GenerationRequest) -> list[int] | None:
        tokenizer = self._tokenizer
        if tokenizer is None:
            return None
        return request.prompt_ids(tokenizer)

    def key(self, payload: Any, namespace: bytes | None, block_size: int | None = None) -> RoutingKey | None:
        """The routing key of a request dict: its chain under `namespace` (none without one, or
        before the tokenizer is loaded) and its session. None for a request the engine would refuse:
        a replica answers it with the same error, wherever it goes."""
        try:
            request = parse_request(payload, self.config)
        except InvalidRequestError:
            return None
        session, sticky = (request.session_id, True) if request.session_id else chat_session(request)
        if namespace is None:
            return RoutingKey((), session, sticky)
        ids = self.token_ids(request)
        if ids is None:
            return RoutingKey((), session, sticky)
        size = block_size or self.config.block_size
        chain = tuple(block_id(d) for d in chain_hashes(ids, size, namespace))
        return RoutingKey(chain, session, sticky)
