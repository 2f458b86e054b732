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

from bulk.engine.tools import CALL_CLOSE, CALL_OPEN, TOOLS_PREAMBLE
from bulk.errors import InvalidRequestError

if TYPE_CHECKING:
    from bulk.engine.request import GenerationRequest

ROLES = ("system", "developer", "user", "assistant", "tool")
ASSISTANT_HEADER = "<|assistant|>\n"
# `GenerationRequest.prompt` keys the response cache: see `request_prompt`.
_TAG = "\x00"

# (role, content), or (role, content, the message's tool fields as canonical JSON): an assistant
# turn's `tool_calls`, a tool turn's `tool_call_id` and `name`.
Turn = tuple[str, str] | tuple[str, str, str]


def render_prompt(request: GenerationRequest, tokenizer: Any) -> str:
    """The text the model is given for `request` (see the module's docstring). `tokenizer` is the
    model's (`LoadedModel.tokenizer`); the system prompt comes with the request (`system_prompt`,
    from the engine's configuration)."""
    if request.raw:
        return request.query
    if request.messages:
        return render_chat(request.messages, tokenizer, request.tools)
    system = request.system_prompt
    if not has_chat_template(tokenizer):
        return f"{system}\n\n{request.query}" if system else request.query
    turns: list[Turn] = [("system", system)] if system else []
    turns.append(("user", request.query))
    return render_chat(turns, tokenizer)


def render_chat(
    messages: Sequence[Turn], tokenizer: Any | None, tools: Sequence[Mapping[str, Any]] = ()
) -> str:
    """A conversation as text ending with an open assistant turn: the model's own chat template when
    it has one, else the simple template above. `tools` (OpenAI's function tools) go to a template
    that knows tools as `tools=`; any other model is told of them in a system turn and shown
    earlier calls as Hermes' blocks (`bulk.engine.tools`)."""
    if tools and has_chat_template(tokenizer) and template_takes_tools(tokenizer):
        dicts = [turn_message(turn, arguments_as_object=True) for turn in messages]
        return tokenizer.apply_chat_template(dicts, add_generation_prompt=True, tools=list(tools))  # type: ignore[union-attr]
    turns: list[tuple[str, str]] = [(turn[0], _text_with_calls(turn)) for turn in messages]
    if tools:
        turns = _with_tools_preamble(turns, tools)
    if not has_chat_template(tokenizer):
        return render_simple(turns)
    assert tokenizer is not None
    return tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in turns], add_generation_prompt=True
    )


def render_simple(messages: Sequence[Turn]) -> str:
    parts = [f"<|{turn[0]}|>\n{turn[1]}\n" for turn in messages]
    return "".join(parts) + ASSISTANT_HEADER


def template_takes_tools(tokenizer: Any) -> bool:
    """The model's chat template renders OpenAI's `tools` itself (it refers to them)."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def turn_message(turn: Turn, arguments_as_object: bool = False) -> dict[str, Any]:
    """A turn as an OpenAI message dict (what `parse_messages` reads back). Chat templates that
    render tool calls take each call's `arguments` as an object (`arguments_as_object`)."""
    message: dict[str, Any] = {"role": turn[0], "content": turn[1]}
    if len(turn) == 3:
        message.update(json.loads(turn[2]))
        if arguments_as_object:
            for call in message.get("tool_calls", ()):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return message


def _text_with_calls(turn: Turn) -> str:
    """A turn's text for a model told of tools by `TOOLS_PREAMBLE`: an assistant turn's calls as the
    blocks it was asked to write."""
    if len(turn) < 3:
        return turn[1]
    calls = json.loads(turn[2]).get("tool_calls", ())
    bodies = [
        f'{{"name": {json.dumps(c["function"]["name"])}, "arguments": {c["function"]["arguments"]}}}'
        for c in calls
    ]
    blocks = [f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}" for body in bodies]
    return "\n".join(([turn[1]] if turn[1] else []) + blocks)


def _with_tools_preamble(
    turns: list[tuple[str, str]], tools: Sequence[Mapping[str, Any]]
) -> list[tuple[str, str]]:
    preamble = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if turns and turns[0][0] in ("system", "developer"):
        return [(turns[0][0], f"{turns[0][1]}\n\n{preamble}"), *turns[1:]]
    return [("system", preamble), *turns]


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
        extra = _tool_fields(message, role, f"messages.{index}")
        turns.append((role, content, extra) if extra else (role, content))
    return tuple(turns)


def _tool_fields(message: Mapping[str, Any], role: str, where: str) -> str | None:
    """An assistant message's `tool_calls` and a tool message's `tool_call_id` (and `name`), checked,
    as canonical JSON; None for a message without them."""
    fields: dict[str, Any] = {}
    calls = message.get("tool_calls")
    if calls:
        if role != "assistant" or not isinstance(calls, list):
            raise InvalidRequestError(
                f"{where}.tool_calls", "only an assistant message has a list of tool calls"
            )
        checked = []
        for i, call in enumerate(calls):
            function = call.get("function") if isinstance(call, Mapping) else None
            name = function.get("name") if isinstance(function, Mapping) else None
            arguments = function.get("arguments", "{}") if isinstance(function, Mapping) else None
            if not isinstance(name, str) or not isinstance(arguments, str):
                raise InvalidRequestError(
                    f"{where}.tool_calls.{i}",
                    'must be {"id", "type": "function", "function": {"name", "arguments"}}',
                )
            try:
                parsed = json.loads(arguments)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                raise InvalidRequestError(
                    f"{where}.tool_calls.{i}.function.arguments", "must be a JSON object's text"
                )
            checked.append(
                {
                    "id": str(call.get("id") or f"call_{i}"),
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            )
        fields["tool_calls"] = checked
    for key in ("tool_call_id", "name"):
        value = message.get(key)
        if value is not None and role == "tool":
            if not isinstance(value, str):
                raise InvalidRequestError(f"{where}.{key}", "must be a string")
            fields[key] = value
    return json.dumps(fields, ensure_ascii=False, sort_keys=True) if fields else None


def request_prompt(
    query: str, *, raw: bool, messages: tuple[Turn, ...], tools: tuple[Mapping[str, Any], ...] = ()
) -> str:
    """`GenerationRequest.prompt`: the request's input as one string, on which the response cache
    keys answers, so two requests that give the model different input must differ here. A query (the
    hot path) is its own text; a raw prompt and a conversation carry a tag that starts with NUL, and
    so does a query that itself starts with NUL, so no two kinds ever meet."""
    if messages:
        offered = f"{_TAG}tools{_TAG}{json.dumps(tools, ensure_ascii=False)}" if tools else ""
        return f"{_TAG}chat{_TAG}{json.dumps(messages, ensure_ascii=False)}{offered}"
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
