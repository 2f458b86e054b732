"""Turning chat messages into one prompt.

A Hugging Face model with a chat template gets its tokenizer's own `apply_chat_template`. The demo
models (byte-level tokenizer, no template) and models without one get this simple, documented
template, one block per message and an open assistant block at the end:

    <|system|>
    You are terse.
    <|user|>
    Create marketing strategy
    <|assistant|>

Identical conversations render to identical text, and a longer conversation starts with the text of
the shorter one, so multi-turn chats reuse the KV of every earlier turn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ASSISTANT_HEADER = "<|assistant|>\n"


def render_simple(messages: Sequence[dict[str, str]]) -> str:
    parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
    return "".join(parts) + ASSISTANT_HEADER


def _hf_template(tokenizer: Any) -> Any:
    """The tokenizer's `apply_chat_template` when it has a template, else None. Our `HFTokenizer`
    wraps the Hugging Face tokenizer, so look through it too."""
    for candidate in (tokenizer, getattr(tokenizer, "_tokenizer", None)):
        if candidate is None:
            continue
        apply = getattr(candidate, "apply_chat_template", None)
        if callable(apply) and getattr(candidate, "chat_template", None):
            return apply
    return None


def render_chat(messages: Sequence[dict[str, str]], tokenizer: Any | None) -> str:
    apply = _hf_template(tokenizer) if tokenizer is not None else None
    if apply is None:
        return render_simple(messages)
    return apply(list(messages), tokenize=False, add_generation_prompt=True)
