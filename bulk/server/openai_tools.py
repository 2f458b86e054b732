"""Tool calls on `/v1/chat/completions`: the request's `tools`, `tool_choice` and
`parallel_tool_calls` turned into the engine's request fields, and its answers shaped as OpenAI's
`message.tool_calls` and streamed `delta.tool_calls`. What the model is told and how calls are
read out of its text is the engine's (`bulk.engine.tools`); this module only maps and shapes.

- `tool_choice: "none"` (or no tools): the tools are not given to the model, the answer is text.
- `"auto"` (the default with tools): the model decides; a stream holds text back only while it may
  still be the start of a call (`may_be_a_call`), then streams it as content or, at the end, as calls.
- `"required"` or `{"type": "function", "function": {"name"}}`: the answer is constrained to calls
  (`forced_call_schema`), so its arguments always parse and follow the tool's schema. A named
  function's arguments stream as they are generated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bulk.engine.tools import (
    ToolCall,
    call_id,
    forced_call_schema,
    forced_calls,
    may_be_a_call,
    parse_tool_calls,
)
from bulk.errors import InvalidRequestError


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]]
    forced: bool  # "required" or a named function: the answer is calls, by constraint
    name: str | None  # the named function
    parallel: bool

    @property
    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]

    def engine_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"tools": self.tools}
        if self.forced:
            fields["structured_outputs"] = {"json": forced_call_schema(self.tools, self.name, self.parallel)}
        return fields

    def message(self, text: str, finish: str) -> tuple[dict[str, Any], str]:
        """(the answer's message, its finish reason) for a finished answer's text."""
        calls = self.calls(text, finish)
        if not calls:
            return {"role": "assistant", "content": text}, finish
        content = parse_tool_calls(text, self.names, self.parallel)[0] if not self.forced else ""
        message = {
            "role": "assistant",
            "content": content or None,
            "tool_calls": [call.to_openai() for call in calls],
        }
        return message, "tool_calls"

    def calls(self, text: str, finish: str) -> list[ToolCall]:
        if self.forced:
            # An answer cut by max_tokens is not a whole call; it stays text.
            return forced_calls(text, self.name) if finish == "stop" else []
        return parse_tool_calls(text, self.names, self.parallel)[1]


def tool_plan(tools: list[dict[str, Any]] | None, choice: Any, parallel: bool | None) -> ToolPlan | None:
    """The plan of a chat request's tool fields (already typed by the schema); None when the model is
    not to see tools. A named function that is not among the tools is a 422 naming `tool_choice`."""
    if not tools or choice == "none":
        if choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice", "a tool can only be required when tools are given")
        return None
    names = [tool["function"]["name"] for tool in tools]
    name = None
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in names:
            raise InvalidRequestError("tool_choice.function.name", f"{name!r} is not one of the tools")
    forced = choice == "required" or name is not None
    return ToolPlan(tools, forced, name, True if parallel is None else parallel)


class ToolStream:
    """One streamed choice's deltas under a tool plan: `feed` each text piece, `finish` once."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.held = ""  # text not sent yet: it may still be (part of) a call
        self.streaming_text = False  # the answer turned out to be text: pieces go out as content
        self.named_id = call_id() if plan.name is not None else None

    def start(self) -> list[dict[str, Any]]:
        """Deltas before any text: a named function's call header (its arguments follow)."""
        if self.named_id is None:
            return []
        call = ToolCall(self.plan.name or "", "", self.named_id).to_openai(0)
        return [{"tool_calls": [call]}]

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.named_id is not None:
            return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}] if text else []
        if self.streaming_text:
            return [{"content": text}] if text else []
        self.held += text
        if self.plan.forced or may_be_a_call(self.held):
            return []
        self.streaming_text = True
        held, self.held = self.held, ""
        return [{"content": held}]

    def finish(self, text: str, finish: str) -> tuple[list[dict[str, Any]], str]:
        """The deltas left at the end of the answer (`text`, its whole text) and its finish reason."""
        if self.named_id is not None:
            return [], "tool_calls" if finish == "stop" else finish
        if self.streaming_text:
            return [], finish
        calls = self.plan.calls(text, finish)
        if not calls:
            return ([{"content": self.held}] if self.held else []), finish
        deltas: list[dict[str, Any]] = []
        content = "" if self.plan.forced else parse_tool_calls(text, self.plan.names, self.plan.parallel)[0]
        if content:
            deltas.append({"content": content})
        deltas += [{"tool_calls": [call.to_openai(index)]} for index, call in enumerate(calls)]
        return deltas, "tool_calls"
