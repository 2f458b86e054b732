"""Turning chat messages into one prompt.

A Hugging Face model with a chat template gets its own template (`HFTokenizer.apply_chat_template`). The demo
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


def has_chat_template(tokenizer: Any | None) -> bool:
    """True for a tokenizer with its own chat template (our `HFTokenizer` over a model that has one)."""
    return callable(getattr(tokenizer, "apply_chat_template", None)) and bool(
        getattr(tokenizer, "chat_template", None)
    )


def render_chat(messages: Sequence[dict[str, str]], tokenizer: Any | None) -> str:
    if not has_chat_template(tokenizer):
        return render_simple(messages)
    # The rendered text starts with the template's BOS text; `HFTokenizer.encode` adds no second one.
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
