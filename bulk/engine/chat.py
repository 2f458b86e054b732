"""What the model is given for a request: a query as a user turn through the model's chat template,
a conversation through the same template, or a raw prompt as it is.

- A **query** (the guide's routes: `/api/query`, `/api/batch`, `/ws/query`, gRPC, Celery, the
  engine's `{"query": ...}`) is sent as a user turn after the configured `system_prompt`, rendered
  by the model's chat template. Every query thus starts with the same system turn, whose KV blocks
  are computed once and reused. A model without a chat template (the demo models) gets the query as
  it is, after the system prompt and a blank line when one is set.
- A **conversation** (`"messages"`: OpenAI's `/v1/chat/completions`) is rendered whole by the
  template, as given (the configured system prompt is not added: the client brings its own). A model
  without a chat template gets this simple, documented one, one block per message and an open
  assistant block at the end::

      <|system|>
      You are terse.
      <|user|>
      Create marketing strategy
      <|assistant|>

- A **raw** prompt (`"raw": true`: `/v1/completions`) goes to the model as it is.

Identical requests render to identical text, and a longer conversation starts with the text of the
shorter one, so multi-turn chats reuse the KV of every earlier turn. Rendered text starts with the
template's BOS text; `HFTokenizer.encode` adds no second one."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from bulk.errors import InvalidRequestError

if TYPE_CHECKING:
    from bulk.engine.request import GenerationRequest

ROLES = ("system", "developer", "user", "assistant", "tool")
ASSISTANT_HEADER = "<|assistant|>\n"
# `GenerationRequest.prompt` keys the response cache: see `request_prompt`.
_TAG = "\x00"

Turn = tuple[str, str]  # (role, content)


def render_prompt(request: GenerationRequest, tokenizer: Any) -> str:
    """The text the model is given for `request` (see the module's docstring). `tokenizer` is the
    model's (`LoadedModel.tokenizer`); the system prompt comes with the request (`system_prompt`,
    from the engine's configuration)."""
    if request.raw:
        return request.query
    if request.messages:
        return render_chat(request.messages, tokenizer)
    system = request.system_prompt
    if not has_chat_template(tokenizer):
        return f"{system}\n\n{request.query}" if system else request.query
    turns: list[Turn] = [("system", system)] if system else []
    turns.append(("user", request.query))
    return render_chat(turns, tokenizer)


def render_chat(messages: Sequence[Turn], tokenizer: Any | None) -> str:
    """A conversation as text ending with an open assistant turn: the model's own chat template when
    it has one, else the simple template above."""
    if not has_chat_template(tokenizer):
        return render_simple(messages)
    assert tokenizer is not None
    turns = [{"role": role, "content": content} for role, content in messages]
    return tokenizer.apply_chat_template(turns, add_generation_prompt=True)


def render_simple(messages: Sequence[Turn]) -> str:
    parts = [f"<|{role}|>\n{content}\n" for role, content in messages]
    return "".join(parts) + ASSISTANT_HEADER


def missing_template_notice(tokenizer: Any | None, model: str) -> str | None:
    """What a model without a chat template will be given instead, said once when it loads (None for
    a model with one): users who bring a base model or a GGUF file without `tokenizer.chat_template`
    should know that their chats are not in the format the model was trained on."""
    if has_chat_template(tokenizer):
        return None
    return (
        f"model {model!r} has no chat template: conversations (OpenAI's messages) are rendered in BUL's "
        "fallback format, one '<|role|>' line before each message and an open '<|assistant|>' block "
        "at the end, and queries are sent as they are (after the system prompt and a blank line); "
        "give the model a chat template for the format it was trained on"
    )


def has_chat_template(tokenizer: Any | None) -> bool:
    """True for a tokenizer with its own chat template (our `HFTokenizer` over a model that has one)."""
    return callable(getattr(tokenizer, "apply_chat_template", None)) and bool(
        getattr(tokenizer, "chat_template", None)
    )


def parse_messages(value: Any) -> tuple[Turn, ...]:
    """A request's `messages`: a non-empty list of `{"role", "content"}` objects (`content` a string,
    or None for an empty one). Raises `InvalidRequestError` naming the bad entry."""
    if not isinstance(value, list | tuple) or not value:
        raise InvalidRequestError("messages", 'must be a non-empty list of {"role", "content"} objects')
    turns: list[Turn] = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages.{index}", 'must be an object {"role", "content"}')
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidRequestError(f"messages.{index}.role", f"must be one of {', '.join(ROLES)}")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages.{index}.content", "must be a string")
        turns.append((role, content))
    return tuple(turns)


def request_prompt(query: str, *, raw: bool, messages: tuple[Turn, ...]) -> str:
    """`GenerationRequest.prompt`: the request's input as one string, on which the response cache
    keys answers, so two requests that give the model different input must differ here. A query (the
    hot path) is its own text; a raw prompt and a conversation carry a tag that starts with NUL, and
    so does a query that itself starts with NUL, so no two kinds ever meet."""
    if messages:
        return f"{_TAG}chat{_TAG}{json.dumps(messages, ensure_ascii=False)}"
    if raw:
        return f"{_TAG}raw{_TAG}{query}"
    return f"{_TAG}query{_TAG}{query}" if query.startswith(_TAG) else query


def messages_chars(messages: Sequence[Mapping[str, Any]]) -> int:
    """Characters of content in a `messages` list, for the servers' size limit."""
    return sum(
        len(content)
        for m in messages
        if isinstance(m, Mapping) and isinstance(content := m.get("content"), str)
    )
