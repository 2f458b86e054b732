"""Request bodies of the OpenAI-compatible API (the subset BUL KV serves) and the answer shapes.

Unknown fields are ignored, as OpenAI-compatible servers do: clients send parameters we do not use
(`presence_penalty`, `user`, ...). Fields we do use are type-checked; a bad one is a 422 naming it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from bulk.server.schemas import Integer, Number


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: Integer | None = Field(None, description="Default: the server's BUL_DEFAULT_MAX_NEW_TOKENS.")
    temperature: Number | None = Field(None, description="Default 1.0, as OpenAI; 0 decodes greedily.")
    top_p: Number | None = None
    n: Literal[1] = Field(1, description="Only one choice per request is served.")
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

    def engine_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": 1.0 if self.temperature is None else self.temperature}
        for ours, theirs in (
            ("max_new_tokens", self.max_tokens),
            ("top_p", self.top_p),
            ("seed", self.seed),
            ("ignore_eos", self.ignore_eos),
            ("min_tokens", self.min_tokens),
        ):
            if theirs is not None:
                params[ours] = theirs
        # An empty list is "no stop strings"; an empty string goes on, for the engine to refuse (422),
        # as the published schema says (it was once dropped here, answered 200).
        if self.stop is not None and self.stop != []:
            params["stop"] = self.stop
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] = Field(..., description="One prompt (a list must hold exactly one).")

    def prompt_text(self) -> str | None:
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if len(self.prompt) == 1 else None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Integer | None = Field(None, description="The newer name of max_tokens.")

    def engine_params(self) -> dict[str, Any]:
        params = super().engine_params()
        if self.max_completion_tokens is not None:
            params["max_new_tokens"] = self.max_completion_tokens
        return params


def usage(result: Mapping[str, Any]) -> dict[str, Any]:
    prompt = int(result.get("prompt_tokens", 0))
    completion = int(result.get("completion_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": int(result.get("cached_tokens", 0))},
    }


def finish_reason(result: Mapping[str, Any]) -> str:
    return "length" if result.get("finish_reason") == "length" else "stop"


def envelope(kind: str, request_id: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
