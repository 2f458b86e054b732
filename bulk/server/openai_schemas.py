"""Request bodies of the OpenAI-compatible API (the subset BUL KV serves) and the answer shapes.

Fields we use are type-checked; a bad one is a 422 naming it. A field we do not serve is refused
with a 422 naming it (`unserved_field`), not dropped: a client must be able to tell that
`response_format` or `tools` did not happen. Accepted and ignored: the fields that only describe the
caller (`user`, `metadata`, `store`), and a few unserved ones sent with the value that asks for
nothing (`NO_OP_VALUES`: `"echo": false`, `"tools": []`, ...), which some clients always send."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from bulk.engine.request import check_constraint
from bulk.engine.result import TokenLogprobs
from bulk.errors import InvalidRequestError
from bulk.server.schemas import Integer, Number

# Choices per request (`n`): each is a request of the batch.
MAX_CHOICES = 8
# Unserved fields with the value that asks for nothing: accepted as if absent.
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "echo": (False, None),
    "best_of": (1, None),
    "suffix": (None, ""),
    # The chat route serves tools (its own fields); the completions route takes them only empty.
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: StrictStr | None = None
    description: StrictStr | None = None
    # `schema` is a name pydantic's BaseModel keeps for itself.
    json_schema: dict[StrictStr, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = Field(
        None, description="Always strict here: every answer follows the schema."
    )


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _Sampling(BaseModel):
    # Other fields are kept (not ignored) so that `unserved_field` can name them; the published
    # schema says what is served (`additionalProperties: false`).
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    model: StrictStr | None = None
    max_tokens: Integer | None = Field(None, description="Default: the server's BUL_DEFAULT_MAX_NEW_TOKENS.")
    temperature: Number | None = Field(None, description="Default 1.0, as OpenAI; 0 decodes greedily.")
    top_p: Number | None = None
    n: Integer | None = Field(
        None, description=f"Choices (1 to {MAX_CHOICES}), generated together; their prompt's KV is shared."
    )
    stop: StrictStr | list[StrictStr] | None = None
    seed: Integer | None = None
    # vLLM's extra sampling fields, which it takes at the top level of the body (users force vLLM and
    # BUL KV to the same answer length with them).
    ignore_eos: StrictBool | None = Field(None, description="vLLM's: do not stop at the end of sequence.")
    min_tokens: Integer | None = Field(
        None, description="vLLM's: no end of sequence and no stop string before this many tokens."
    )
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = Field(None, description="-2 to 2; default 0.")
    frequency_penalty: Number | None = Field(None, description="-2 to 2; default 0.")
    logit_bias: dict[StrictStr, Number] | None = Field(
        None, description="Token id (as a string) -> a bias from -100 to 100 added to its logit."
    )
    # vLLM's extra fields.
    repetition_penalty: Number | None = Field(
        None, description="vLLM's (Hugging Face's semantics): 0.01 to 100; 1 (the default) changes nothing."
    )
    stop_token_ids: list[Integer] | None = Field(
        None, description="vLLM's: token ids that end the answer as the end of sequence does."
    )
    # Structured outputs: OpenAI's `response_format`, and vLLM's fields for the same (one of them).
    response_format: ResponseFormat | None = Field(
        None, description="`json_object`, or `json_schema` (`strict` or not, the answer follows the schema)."
    )
    structured_outputs: dict[StrictStr, Any] | None = Field(
        None, description="vLLM's: exactly one of `json`, `json_object`, `regex`, `choice`, `grammar`."
    )
    guided_json: dict[StrictStr, Any] | StrictStr | None = Field(None, description="vLLM's: a JSON schema.")
    guided_regex: StrictStr | None = Field(None, description="vLLM's: a regular expression.")
    guided_choice: list[StrictStr] | None = Field(None, description="vLLM's: one of these strings.")
    guided_grammar: StrictStr | None = Field(None, description="vLLM's: a grammar (GBNF or Lark).")
    # Describe the caller; accepted and ignored.
    user: StrictStr | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    store: StrictBool | None = None

    def choices(self) -> int:
        """`n`, checked (a 422 naming it)."""
        if self.n is None:
            return 1
        if not 1 <= self.n <= MAX_CHOICES:
            raise InvalidRequestError("n", f"must be between 1 and {MAX_CHOICES}")
        return self.n

    def unserved_field(self) -> str | None:
        """The first field of the body this server does not serve (not one of the fields above, nor a
        no-op value of `NO_OP_VALUES`), or None."""
        for name, value in (self.model_extra or {}).items():
            if value not in NO_OP_VALUES.get(name, ()):
                return name
        return None

    def engine_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": 1.0 if self.temperature is None else self.temperature}
        for ours, theirs in (
            ("max_new_tokens", self.max_tokens),
            ("top_p", self.top_p),
            ("seed", self.seed),
            ("ignore_eos", self.ignore_eos),
            ("min_tokens", self.min_tokens),
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
            ("repetition_penalty", self.repetition_penalty),
            ("logit_bias", self.logit_bias),
            ("stop_token_ids", self.stop_token_ids),
        ):
            if theirs is not None:
                params[ours] = theirs
        # An empty list is "no stop strings"; an empty string goes on, for the engine to refuse (422),
        # as the published schema says (it was once dropped here, answered 200).
        if self.stop is not None and self.stop != []:
            params["stop"] = self.stop
        constraint = self.constraint()
        if constraint is not None:
            params["structured_outputs"] = check_constraint(constraint[1], constraint[0])
        return params

    def constraint(self) -> tuple[str, dict[str, Any]] | None:
        """(the body's field, the engine's `structured_outputs` value) of the one way the body asks
        for structured output; a second way is a 422 naming it."""
        ways: list[tuple[str, dict[str, Any]]] = []
        if self.response_format is not None and self.response_format.type != "text":
            fmt = self.response_format
            if fmt.type == "json_object":
                ways.append(("response_format", {"json_object": True}))
            elif fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise InvalidRequestError(
                    "response_format.json_schema.schema", "a json_schema format needs a schema"
                )
            else:
                ways.append(("response_format.json_schema.schema", {"json": fmt.json_schema.json_schema}))
        if self.structured_outputs is not None:
            ways.append(("structured_outputs", self.structured_outputs))
        for name, kind in (
            ("guided_json", "json"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ):
            value = getattr(self, name)
            if value is not None:
                ways.append((name, {kind: value}))
        if len(ways) > 1:
            raise InvalidRequestError(
                ways[1][0], f"give one structured output, not both {ways[0][0]} and this"
            )
        return ways[0] if ways else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] = Field(..., description="One prompt (a list must hold exactly one).")
    logprobs: Integer | None = Field(
        None, description="Each token's log-probability, with this many most likely alternatives (0-20)."
    )

    def engine_params(self) -> dict[str, Any]:
        params = super().engine_params()
        if self.logprobs is not None:
            params["logprobs"] = self.logprobs
        return params

    def prompt_text(self) -> str | None:
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if len(self.prompt) == 1 else None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    arguments: StrictStr = Field(description="The arguments, a JSON object's text.")


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    # An assistant turn's calls, and a tool turn's answer to one of them.
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: StrictStr | None = None
    name: StrictStr | None = None

    def engine_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[StrictStr, Any] | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: list[Tool] | None = Field(None, description="Function tools the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="`auto` (the default with tools), `none`, `required`, or a named function."
    )
    parallel_tool_calls: StrictBool | None = Field(
        None, description="Several calls in one answer (default true)."
    )
    max_completion_tokens: Integer | None = Field(None, description="The newer name of max_tokens.")
    logprobs: StrictBool | None = Field(None, description="Return each answer token's log-probability.")
    top_logprobs: Integer | None = Field(
        None, description="With logprobs: this many most likely alternatives per token (0-20)."
    )

    def tool_fields(self) -> tuple[list[dict[str, Any]] | None, Any]:
        """The tools as plain dicts, and `tool_choice` as a string or a dict."""
        tools = [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None
        choice = (
            self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel) else self.tool_choice
        )
        return tools, choice

    def engine_params(self) -> dict[str, Any]:
        params = super().engine_params()
        if self.max_completion_tokens is not None:
            params["max_new_tokens"] = self.max_completion_tokens
        if self.logprobs:
            # The engine's `logprobs` is the number of alternatives (None: no logprobs).
            params["logprobs"] = self.top_logprobs or 0
        return params


def usage(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One usage for a request's choices: the prompt counted once (as OpenAI counts it), the
    completions added up; `cached_tokens`: the first choice's (the prompt as the request found the
    cache; the other choices find more of it, computed by the first)."""
    prompt = int(results[0].get("prompt_tokens", 0))
    completion = sum(int(result.get("completion_tokens", 0)) for result in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": int(results[0].get("cached_tokens", 0))},
    }


def finish_reason(result: Mapping[str, Any]) -> str:
    return "length" if result.get("finish_reason") == "length" else "stop"


def envelope(kind: str, request_id: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}


# ---- logprobs, as each route writes them ----------------------------------------------------------


def chat_logprobs(entries: list[TokenLogprobs] | None) -> dict[str, Any] | None:
    """The chat format: `{"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": None}`."""
    if entries is None:
        return None
    content = [
        {
            **_chat_token(entry),
            "top_logprobs": [_chat_token(alternative) for alternative in entry["top_logprobs"]],
        }
        for entry in entries
    ]
    return {"content": content, "refusal": None}


def _chat_token(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {"token": entry["token"], "logprob": entry["logprob"], "bytes": entry["bytes"]}


def completion_logprobs(entries: list[TokenLogprobs] | None, offset: int = 0) -> dict[str, Any] | None:
    """The legacy completions format: `tokens`, `token_logprobs`, `top_logprobs` (token text ->
    logprob: the alternatives and, as OpenAI's, always the chosen token, so up to `logprobs` + 1) and
    `text_offset` (each token's start in the answer's text, from `offset`: the text streamed before)."""
    if entries is None:
        return None
    tokens, offsets, tops = [], [], []
    for entry in entries:
        tokens.append(entry["token"])
        offsets.append(offset)
        offset += len(entry["token"])
        top: dict[str, float] = {}
        for alternative in [*entry["top_logprobs"], entry]:
            top.setdefault(alternative["token"], alternative["logprob"])
        tops.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": [entry["logprob"] for entry in entries],
        "top_logprobs": tops,
        "text_offset": offsets,
    }
