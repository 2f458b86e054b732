"""Request bodies of the guide's routes, and the field limits the server enforces on every API.

Types are checked by pydantic (a 422 naming the field); the engine checks values against its own
configuration (`max_new_tokens`, prompt length) and raises `InvalidRequestError`, which the error
handlers turn into the same 422 shape. Limits that depend on settings are checked in `check_limits`."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

from bulk.engine.chat import messages_chars
from bulk.errors import InvalidRequestError
from bulk.server.settings import ServerSettings

Number = StrictInt | StrictFloat


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer, as JSON Schema's "integer" means it: 3 or 3.0, never 3.5, "3" or true. The published
# schema says "integer", and JSON does not tell 3.0 from 3, so the API must take both.
Integer = Annotated[StrictInt, BeforeValidator(_integral)]


# Engine request fields (`bulk.engine.request.FIELDS`) that `QueryRequest` does not take: a conversation
# is the OpenAI chat route's, and so are the tools offered to one. `tests/test_schemas.py` checks the
# model against `FIELDS` minus these.
NOT_IN_QUERY_BODY = frozenset(("messages", "tools"))


class QueryRequest(BaseModel):
    """One query, as the guide sends it (`{"query", "priority"}`; `text` is accepted instead of
    `query`), with the engine's optional generation parameters: one field per engine request field
    (`bulk.engine.request.FIELDS`, but `NOT_IN_QUERY_BODY`), typed for the published schema."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"query": "Create marketing strategy", "priority": 1}]},
    )

    query: StrictStr | None = Field(None, description="The prompt (or give `text`).")
    text: StrictStr | None = Field(None, description="The prompt, the guide's other name for it.")
    priority: Integer | None = Field(None, description="Higher runs first; default 1.")
    max_new_tokens: Integer | None = None
    temperature: Number | None = Field(None, description="0 (the default) decodes greedily.")
    top_p: Number | None = None
    seed: Integer | None = None
    session_id: StrictStr | None = None
    stop: StrictStr | list[StrictStr] | None = None
    ignore_eos: StrictBool | None = Field(
        None, description="Do not stop at the end of sequence: generate up to max_new_tokens (as vLLM)."
    )
    min_tokens: Integer | None = Field(
        None,
        description="No end of sequence and no stop string before this many tokens (as vLLM); at most "
        "max_new_tokens. Default 0.",
    )
    response_cache: StrictBool | None = Field(
        None, description="Answer from the response cache; default: only when the request is deterministic."
    )
    raw: StrictBool | None = Field(
        None,
        description="Send the query to the model as it is; default: as a user turn through the model's "
        "chat template, after the server's system prompt (BUL_SYSTEM_PROMPT).",
    )
    request_id: StrictStr | None = None
    logprobs: Integer | None = Field(
        None,
        description="Return each answer token's log-probability with this many most likely alternatives "
        "(0-20) in the answer's `logprobs` list; default: none (not computed).",
    )
    presence_penalty: Number | None = Field(
        None, description="-2 to 2 (as OpenAI): subtracted from the logit of every token the answer holds."
    )
    frequency_penalty: Number | None = Field(
        None,
        description="-2 to 2 (as OpenAI): times its count in the answer, subtracted from a token's logit.",
    )
    repetition_penalty: Number | None = Field(
        None,
        description="0.01 to 100 (as Hugging Face and vLLM): the logits of the prompt's and answer's tokens "
        "divided by it when positive, multiplied when negative; 1 (the default) changes nothing.",
    )
    logit_bias: dict[StrictStr, Number] | None = Field(
        None, description="Token id (as a string) -> a bias from -100 to 100 added to its logit (as OpenAI)."
    )
    stop_token_ids: list[Integer] | None = Field(
        None, description="Token ids that end the answer as the end of sequence does (as vLLM)."
    )
    structured_outputs: dict[StrictStr, Any] | None = Field(
        None,
        description="Constrain the answer (as vLLM's `structured_outputs`): an object with exactly one of "
        "`json` (a JSON schema, or its JSON text), `json_object` (true: any JSON object), `regex` (a "
        "regular expression), `choice` (a list of strings) or `grammar` (a Lark or GBNF grammar). Every "
        "token of the answer follows it; a constraint that cannot be served is a 422 naming "
        "`structured_outputs.<kind>`.",
        examples=[{"json": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}}}}],
    )

    def to_engine(self, settings: ServerSettings) -> dict[str, Any]:
        # `model_dump(exclude_none=True)` for this flat model, at a fraction of its cost (hot path).
        payload = {name: value for name, value in self.__dict__.items() if value is not None}
        check_limits(payload, settings)
        return payload


def check_limits(payload: dict[str, Any], settings: ServerSettings, prefix: str = "") -> None:
    """The server's field limits on an engine request dict; raises `InvalidRequestError`."""
    for name in ("query", "text"):
        value = payload.get(name)
        if isinstance(value, str) and len(value) > settings.max_query_chars:
            raise InvalidRequestError(
                prefix + name, f"longer than {settings.max_query_chars} characters (BUL_MAX_QUERY_CHARS)"
            )
    messages = payload.get("messages")
    if isinstance(messages, list) and messages_chars(messages) > settings.max_query_chars:
        raise InvalidRequestError(
            prefix + "messages",
            f"longer than {settings.max_query_chars} characters in all (BUL_MAX_QUERY_CHARS)",
        )
    priority = payload.get("priority")
    if isinstance(priority, int) and not settings.min_priority <= priority <= settings.max_priority:
        raise InvalidRequestError(
            prefix + "priority", f"must be between {settings.min_priority} and {settings.max_priority}"
        )


class BatchAccepted(BaseModel):
    status: str = "processing"
    count: int
    task_ids: list[str]


class TaskStatus(BaseModel):
    task_id: str
    status: str = Field(description="processing, completed or failed")
    result: Any | None = None
    error: str | None = None
