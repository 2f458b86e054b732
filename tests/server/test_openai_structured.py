"""Structured outputs on the OpenAI routes, over a real uvicorn socket with the official `openai`
package: `response_format` (`json_object`, `json_schema`, through the SDK's own
`beta.chat.completions.parse` with a pydantic model), vLLM's `structured_outputs` and `guided_*`
fields for clients written for vLLM, streamed and not; a schema that cannot be served is a 422 naming
the field the client used and the keyword. The demo model's answers are random bytes: only the grammar
makes them valid."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
import requests
from pydantic import BaseModel, Field

CHAT = [{"role": "user", "content": "Describe a person"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


class Pet(BaseModel):
    name: str = Field(max_length=8)
    kind: Literal["cat", "dog", "fish"]
    legs: int = Field(ge=0, le=8)


@pytest.fixture(scope="module")
def server(roomy_server):
    return roomy_server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_the_sdk_parse_helper_with_a_pydantic_model(client):
    answer = client.beta.chat.completions.parse(
        model="demo", messages=CHAT, response_format=Pet, max_tokens=120, temperature=0
    )
    pet = answer.choices[0].message.parsed
    assert isinstance(pet, Pet)
    assert answer.choices[0].finish_reason == "stop"


def test_json_schema_and_json_object(client):
    answer = client.chat.completions.create(
        model="demo",
        messages=CHAT,
        max_tokens=120,
        temperature=0.9,
        seed=1,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
    loose = client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=300, temperature=0, response_format={"type": "json_object"}
    )
    assert loose.choices[0].message.content.startswith("{")


def test_vllm_fields(client):
    regex = client.completions.create(
        model="demo",
        prompt="code:",
        max_tokens=20,
        temperature=0,
        extra_body={"guided_regex": "[A-Z]{2}[0-9]{2}"},
    )
    assert re.fullmatch("[A-Z]{2}[0-9]{2}", regex.choices[0].text)
    choice = client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=10, extra_body={"guided_choice": ["left", "right"]}
    )
    assert choice.choices[0].message.content in ("left", "right")
    schema = client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=120, temperature=0, extra_body={"guided_json": PERSON}
    )
    jsonschema.validate(json.loads(schema.choices[0].message.content), PERSON)
    grammar = client.chat.completions.create(
        model="demo",
        messages=CHAT,
        max_tokens=20,
        temperature=0,
        extra_body={"guided_grammar": 'root ::= "v" [0-9] "." [0-9]'},
    )
    assert re.fullmatch(r"v[0-9]\.[0-9]", grammar.choices[0].message.content)
    new_style = client.chat.completions.create(
        model="demo",
        messages=CHAT,
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["on", "off"]}},
    )
    assert new_style.choices[0].message.content in ("on", "off")


def test_streamed_structured_answer(client):
    stream = client.chat.completions.create(
        model="demo",
        messages=CHAT,
        max_tokens=120,
        temperature=0,
        stream=True,
        extra_body={"guided_json": PERSON},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
                    },
                }
            },
            "response_format.json_schema.schema",
            "not",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", ""),
        ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
        ({"guided_json": {"type": "object", "dependentSchemas": {}}}, "guided_json", "dependentSchemas"),
        ({"guided_choice": []}, "guided_choice", "list"),
        ({"structured_outputs": {"jsonx": {}}}, "structured_outputs.jsonx", "unknown"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one structured output"),
    ],
)
def test_a_constraint_that_cannot_be_served_is_a_422_naming_the_field(server, extra, field, words):
    body = {"model": "demo", "messages": CHAT, "max_tokens": 8, **extra}
    response = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 422, response.text
    text = response.text
    assert field in text and words in text
