"""Tool calls (OpenAI's `tools`): what the model is told about the tools, the constraint that forces
a call, and the calls read back out of an answer's text.

- **Telling the model.** A chat template that knows tools (it mentions `tools`: Qwen2.5, Qwen3,
  SmolLM3, Llama 3.1+, Mistral, Hermes) is given them as `tools=`, in the format the model was
  trained on. A template that does not (SmolLM2, the fallback format) gets them in a system turn of
  ours, `TOOLS_PREAMBLE`, which asks for Hermes' `<tool_call>{...}</tool_call>` blocks.
- **Forcing a call** (`tool_choice: "required"` or a named function): the answer is constrained by a
  JSON schema (`forced_call_schema`): for a named function, its arguments, which then always parse
  and validate; for `required`, a list of `{"name", "arguments"}` objects over the tools, one at
  least (at most one without `parallel_tool_calls`). vLLM forces calls the same way.
- **Reading calls back** (`tool_choice: "auto"`): `parse_tool_calls` finds Hermes blocks, Mistral's
  `[TOOL_CALLS]` list, or an answer that is one JSON call (Llama 3's `{"name", "parameters"}`), and
  keeps only calls to tools the request offered, with JSON-object arguments."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bulk.errors import InvalidRequestError

MAX_TOOLS = 128
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_CALLS = "[TOOL_CALLS]"
TOOLS_PREAMBLE = (
    "You can call functions to help answer. The functions, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with one block per call, and nothing else:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n</tool_call>'
)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for a function name


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it
    id: str

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tools(value: Any, field: str = "tools") -> tuple[dict[str, Any], ...]:
    """A request's `tools`: OpenAI's function tools, checked (a bad one raises
    `InvalidRequestError` naming it), as `{"type": "function", "function": {...}}` dicts."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or len(value) > MAX_TOOLS:
        raise InvalidRequestError(field, f"must be a list of at most {MAX_TOOLS} function tools")
    tools: list[dict[str, Any]] = []
    names: set[str] = set()
    for index, tool in enumerate(value):
        where = f"{field}.{index}"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise InvalidRequestError(f"{where}.type", 'must be "function"')
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise InvalidRequestError(f"{where}.function", "must be an object with a name")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(f"{where}.function.name", "must be 1 to 64 letters, digits, _ . or -")
        if name in names:
            raise InvalidRequestError(f"{where}.function.name", f"{name!r} is given twice")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise InvalidRequestError(f"{where}.function.parameters", "must be a JSON schema object")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError(f"{where}.function.description", "must be a string")
        entry: dict[str, Any] = {"name": name, "parameters": dict(parameters)}
        if description:
            entry["description"] = description
        tools.append({"type": "function", "function": entry})
    return tuple(tools)


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [tool["function"]["name"] for tool in tools]


def forced_call_schema(
    tools: Sequence[Mapping[str, Any]], name: str | None, parallel: bool
) -> dict[str, Any]:
    """The JSON schema an answer forced to call a tool follows: the named function's parameters
    (its arguments are the whole answer), or for `required` a list of calls to any of the tools."""
    by_name = {tool["function"]["name"]: tool["function"] for tool in tools}
    if name is not None:
        return dict(by_name[name]["parameters"])
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": tool_name}, "arguments": function["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool_name, function in by_name.items()
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def forced_calls(text: str, name: str | None) -> list[ToolCall]:
    """The calls of an answer that `forced_call_schema` constrained (finished: it parses)."""
    if name is not None:
        json.loads(text)  # the constraint made it an object; this only says so
        return [ToolCall(name, text.strip(), call_id())]
    return [ToolCall(call["name"], _arguments(call["arguments"]), call_id()) for call in json.loads(text)]


def parse_tool_calls(text: str, names: Sequence[str], parallel: bool = True) -> tuple[str, list[ToolCall]]:
    """(the answer's text besides the calls, the calls) of a free answer; no calls when it holds
    none that parse as a call to one of `names` with an object of arguments."""
    calls: list[ToolCall] = []
    content = text
    if CALL_OPEN in text:
        content = text[: text.index(CALL_OPEN)].strip()
        for block in re.findall(
            re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", text, re.S
        ):
            calls += _calls(_json(block), names)
    elif text.lstrip().startswith(MISTRAL_CALLS):
        content = ""
        calls = _calls(_json(text.lstrip()[len(MISTRAL_CALLS) :]), names)
    elif text.lstrip()[:1] in ("{", "["):
        calls = _calls(_json(text), names)
        content = "" if calls else text
    if not calls:
        return text, []
    return content, calls if parallel else calls[:1]


def may_be_a_call(text: str) -> bool:
    """Whether an answer beginning with `text` may still turn out to be a tool call: a stream holds
    such text back until the answer says which it is."""
    start = text.lstrip()
    if not start:
        return True
    if start[0] in "{[":
        return True
    return any(marker.startswith(start[: len(marker)]) for marker in (CALL_OPEN, MISTRAL_CALLS))


def _json(text: str) -> Any:
    try:
        return json.loads(text.strip())
    except ValueError:
        return None


def _calls(value: Any, names: Sequence[str]) -> list[ToolCall]:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, Mapping) or item.get("name") not in names:
            return []
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _json(arguments)
        if not isinstance(arguments, Mapping):
            return []
        calls.append(ToolCall(str(item["name"]), _arguments(arguments), call_id()))
    return calls


def _arguments(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
