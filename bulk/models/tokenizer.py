"""Tokenizers behind one small interface: the demo model's byte-level tokenizer, and a wrapper over a
Hugging Face tokenizer. The engine only needs `encode`, `decode` and the end-of-sequence ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are tokens 0-255; 256 begins a sequence, 257 ends it, 258 pads.

    Byte-level means any text round-trips and no vocabulary file is needed, so the demo model is built
    in-process with nothing to download."""

    BOS = 256
    EOS = 257
    PAD = 258
    vocab_size = 259
    eos_token_ids = frozenset({EOS})

    def encode(self, text: str) -> list[int]:
        return [self.BOS, *text.encode("utf-8")]

    def grammar_vocabulary(self) -> Any:
        """llguidance's view of these tokens: each byte, and the three special tokens."""
        import llguidance

        class _Bytes:
            eos_token_id = self.EOS
            bos_token_id = self.BOS
            tokens = [bytes([i]) for i in range(256)] + [b"<s>", b"</s>", b"<pad>"]
            special_token_ids = [self.BOS, self.EOS, self.PAD]

            def __call__(self, text: bytes) -> list[int]:
                return list(text)

        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()), eos_token=self.EOS)

    def decode(self, token_ids: Sequence[int]) -> str:
        # A random model can emit byte sequences that are not UTF-8: show them as U+FFFD, never raise.
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer seen through our interface."""

    def __init__(self, tokenizer: Any, extra_eos_ids: int | Sequence[int] | None = None) -> None:
        """`extra_eos_ids`: more tokens that end generation besides the tokenizer's EOS (the model's
        generation config lists a chat template's end-of-turn token there)."""
        self._tokenizer = tokenizer
        self._bos_text: str | None = getattr(tokenizer, "bos_token", None) or None
        self.vocab_size = len(tokenizer)
        ids: list[object] = []  # whatever the tokenizer and config hold; only ints are kept
        for eos in (tokenizer.eos_token_id, extra_eos_ids):
            ids.extend(eos if isinstance(eos, list | tuple) else [eos])
        self.eos_token_ids = frozenset(i for i in ids if isinstance(i, int))

    @property
    def chat_template(self) -> str | None:
        return getattr(self._tokenizer, "chat_template", None)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], **kw: Any) -> str:
        """Chat `messages` rendered by the model's own chat template, as text ending with an open
        assistant turn (`tokenize=False, add_generation_prompt=True` unless `kw` says otherwise;
        other `kw` go to the Hugging Face tokenizer's `apply_chat_template`). Templates write the
        BOS text themselves, and `encode` adds no second one (see there). Raises `ValueError` when
        the tokenizer has no chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        options = {"tokenize": False, "add_generation_prompt": True, **kw}
        return self._tokenizer.apply_chat_template(list(messages), **options)

    def grammar_vocabulary(self) -> Any:
        """llguidance's view of these tokens, from the Rust tokenizer's own description (its JSON),
        with every end-of-sequence id of ours. Fast (Rust) tokenizers only."""
        import copy

        import llguidance

        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("structured outputs need a fast (Rust) Hugging Face tokenizer")
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        return llguidance.LLTokenizer(
            backend.to_str(), n_vocab=self.vocab_size, eos_token=sorted(self.eos_token_ids)
        )

    def encode(self, text: str) -> list[int]:
        # Text that already starts with the BOS text (a rendered chat template, or a prompt written
        # with it) carries its special tokens; adding them again would start it with two BOS tokens.
        add_special = not (self._bos_text and text.startswith(self._bos_text))
        return list(self._tokenizer.encode(text, add_special_tokens=add_special))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)


def grammar_vocabulary(tokenizer: Tokenizer) -> Any:
    """`tokenizer`'s vocabulary as llguidance sees it (an `LLTokenizer`: every token's bytes and the
    end-of-sequence ids), what a structured output's grammar is compiled against. Built once per
    tokenizer (about 0.4 s for a 49k-token BPE vocabulary) and kept on it."""
    vocabulary = getattr(tokenizer, "_grammar_vocabulary", None)
    if vocabulary is None:
        vocabulary = tokenizer.grammar_vocabulary()  # type: ignore[attr-defined]
        tokenizer._grammar_vocabulary = vocabulary  # type: ignore[attr-defined]
    return vocabulary


class TextStream:
    """Turns a growing list of token ids into text deltas.

    Decoding the whole completion each time and emitting the difference is the one method that works
    for every tokenizer (byte-level, BPE with merges across tokens, sentencepiece's leading spaces).
    A trailing U+FFFD means a multi-byte character is still incomplete, so it is held back."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return delta

    def finish(self) -> str:
        """Flush whatever was held back (an incomplete character at the very end)."""
        text = self._tokenizer.decode(self._ids)
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return delta
