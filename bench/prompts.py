"""Prompts of an exact token length, for any tokenizer.

A benchmark that says "a 2048-token prompt" must send exactly 2048 tokens whatever the model: one
character per token on the demo models' byte-level tokenizer, three to five on a BPE tokenizer such
as SmolLM2's. `fit` finds the text by bisection on how much filler it holds (token counts grow with
the text, give or take a merge at the cut), then steps past any count the cut skips.

Prompts start with a tag no other call in the process returns, so the first block of each is new
(nothing cached can match it), and their filler is plain English words."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from bulk.models.tokenizer import Tokenizer

FILLER = "The quick brown fox jumps over the lazy dog while the cache keeps every block it saw. "
_tags = itertools.count()


def new_tag() -> str:
    """A tag no earlier call in this process returned."""
    return f"<{next(_tags):06x}>"


def filler(n_chars: int, start: str = "") -> str:
    """`start` followed by filler words, `n_chars` characters in all (`start` is kept whole)."""
    body = FILLER * (max(0, n_chars - len(start)) // len(FILLER) + 1)
    return (start + body)[: max(n_chars, len(start))]


def fit(tokenizer: Tokenizer, n_tokens: int, build: Callable[[int], str], limit: int | None = None) -> str:
    """`build(c)` for the size `c` whose text encodes to exactly `n_tokens` tokens (the tokenizer's
    own special tokens included, as the engine counts them). `build` must grow with `c`.
    Raises ValueError when no size gives exactly `n_tokens`."""

    def count(c: int) -> int:
        return len(tokenizer.encode(build(c)))

    low, high = 0, limit if limit is not None else 8 * n_tokens + 64
    while count(high) < n_tokens:  # no tokenizer packs more than 8 characters a token here
        low, high = high, 2 * high
    while low < high:  # the smallest c with at least n_tokens tokens
        mid = (low + high) // 2
        if count(mid) < n_tokens:
            low = mid + 1
        else:
            high = mid
    for c in range(low, low + 64):  # a merge at the cut can skip a count: step on
        got = count(c)
        if got == n_tokens:
            return build(c)
        if got > n_tokens + 1:
            break
    raise ValueError(f"no text of this shape encodes to exactly {n_tokens} tokens")


def unique_prompt(tokenizer: Tokenizer, n_tokens: int) -> str:
    """A fresh prompt of exactly `n_tokens` tokens: a new tag, then filler."""
    tag = new_tag()
    return fit(tokenizer, n_tokens, lambda c: filler(c, tag))


def continuation(tokenizer: Tokenizer, prefix: str, n_tokens: int) -> str:
    """Text that, after `prefix`, makes a prompt of exactly `n_tokens` tokens whose first tokens
    are `prefix`'s own (the caller checks: a merge across the seam would change them). The text
    starts with a new tag on a new line, so the seam falls between two pre-tokens."""
    tag = "\n" + new_tag()
    return fit(tokenizer, n_tokens, lambda c: prefix + filler(c, tag))[len(prefix) :]
