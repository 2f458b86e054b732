"""Structured outputs on the engine (the request field `structured_outputs`): every finished answer
follows its JSON schema (checked with `jsonschema`), regex, choice or grammar, greedy and sampled,
alone and inside a batch of 16 beside unconstrained rows, which get the same answers as without
them; a schema the grammar engine cannot serve is an `InvalidRequestError` naming the keyword; a
grammar is compiled once and then found in the cache. The demo model's random weights make the
answers arbitrary, which is the point: only the grammar keeps them valid."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import jsonschema
import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.request import parse_request
from bulk.errors import InvalidRequestError
from bulk.generation.decode import prefill
from bulk.generation.structured import GRAMMARS
from tests.schemas import PERSON

CONFIG = KVCacheConfig(
    model="demo", dtype="float32", default_max_new_tokens=160, max_batch_size=16, response_cache=False
)

# Nested objects, arrays with bounds, enums, anyOf, $ref, string formats, bounded numbers.
SCHEMAS = {
    "person": PERSON,
    "order": {
        "type": "object",
        "$defs": {
            "item": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            }
        },
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 9999},
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 2},
            "status": {"enum": ["new", "paid", "sent"]},
        },
        "required": ["id", "items", "status"],
        "additionalProperties": False,
    },
    "contact": {
        "type": "object",
        "properties": {
            "when": {"type": "string", "format": "date"},
            "reach": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"phone": {"type": "string", "pattern": "^[0-9]{6}$"}},
                        "required": ["phone"],
                        "additionalProperties": False,
                    },
                    {"type": "boolean"},
                ]
            },
            "score": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},
        },
        "required": ["when", "reach", "score"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def engine(demo_model):
    with UltraAdaptiveKVCacheEngine(CONFIG, model=demo_model) as engine:
        yield engine


def _valid(result: dict, schema: dict) -> None:
    assert result["finish_reason"] == "stop", result
    jsonschema.validate(json.loads(result["result"]), schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_every_answer_follows_its_schema(engine, name, sampled):
    schema = SCHEMAS[name]
    for prompt in ("Create marketing strategy", "Give me JSON", "x"):
        sampling = {"temperature": 1.2, "seed": 7} if sampled else {}
        result = engine.process_request_sync(
            {"query": prompt, "structured_outputs": {"json": schema}, **sampling}
        )
        _valid(result, schema)


def test_json_object_regex_choice_and_grammar(engine):
    answer = engine.process_request_sync(
        {"query": "obj", "structured_outputs": {"json_object": True}, "max_new_tokens": 400}
    )
    if answer["finish_reason"] == "stop":
        assert isinstance(json.loads(answer["result"]), dict)
    else:  # the demo model may write one long string; it is still a JSON object's beginning
        assert answer["result"].startswith("{")
    regex = engine.process_request_sync(
        {"query": "code", "structured_outputs": {"regex": "[0-9]{3}-[a-z]{2,4}"}}
    )
    assert re.fullmatch("[0-9]{3}-[a-z]{2,4}", regex["result"]) and regex["finish_reason"] == "stop"
    for seed in range(4):
        choice = engine.process_request_sync(
            {
                "query": "pick",
                "structured_outputs": {"choice": ["yes", "no", 'a "quoted" one']},
                "temperature": 1.0,
                "seed": seed,
            }
        )
        assert choice["result"] in ("yes", "no", 'a "quoted" one')
    # Lark, and GBNF as vLLM's `guided_grammar` takes it.
    lark = engine.process_request_sync(
        {"query": "g", "structured_outputs": {"grammar": 'start: "id=" NUM ";"\nNUM: /[1-9][0-9]{0,3}/'}}
    )
    assert re.fullmatch(r"id=[1-9][0-9]{0,3};", lark["result"])
    gbnf = engine.process_request_sync(
        {"query": "g", "structured_outputs": {"grammar": 'root ::= "ok(" [a-c]+ ")"'}, "max_new_tokens": 40}
    )
    assert re.fullmatch(r"ok\([a-c]+\)", gbnf["result"]) or gbnf["finish_reason"] == "length"


def test_inside_a_batch_of_16_beside_unconstrained_rows(engine):
    prompts = [f"Question number {i}: what now?" for i in range(16)]
    free = {"max_new_tokens": 24}
    solo = [engine.process_request_sync({"query": p, **free})["result"] for p in prompts[8:]]

    async def together():
        requests = [
            engine.process_request({"query": p, "structured_outputs": {"json": PERSON}}) for p in prompts[:8]
        ] + [engine.process_request({"query": p, **free}) for p in prompts[8:]]
        return await asyncio.gather(*requests)

    before = engine.get_stats()["batch"]
    results = asyncio.run(together())
    after = engine.get_stats()["batch"]
    for result in results[:8]:
        _valid(result, PERSON)
    # The unconstrained rows pay nothing and change nothing: their answers are their solo answers.
    assert [r["result"] for r in results[8:]] == solo
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"] if "decode_rows" in after else None
    assert steps > 0
    if rows is not None:
        assert rows / steps > 4  # they decoded together, not one after another


def test_streaming_a_constrained_answer(engine):
    async def stream():
        return [
            event
            async for event in engine.stream_request({"query": "s", "structured_outputs": {"json": PERSON}})
        ]

    events = asyncio.run(stream())
    text = "".join(e.get("token", "") for e in events if not e.get("done"))
    assert text == events[-1]["result"]
    _valid(events[-1], PERSON)


@pytest.mark.parametrize(
    ("value", "field", "words"),
    [
        (
            {"json": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}},
            "structured_outputs.json",
            "not",
        ),
        (
            {"json": {"type": "object", "dependentSchemas": {"a": {}}}},
            "structured_outputs.json",
            "dependentSchemas",
        ),
        ({"json": {"$ref": "#/nowhere"}}, "structured_outputs.json", "nowhere"),
        ({"json": "{not json"}, "structured_outputs.json", "JSON schema"),
        ({"regex": "[0-9"}, "structured_outputs.regex", "unclosed"),
        ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar", "undefined_rule"),
        ({"choice": []}, "structured_outputs.choice", "list"),
        ({"choice": ["a", 3]}, "structured_outputs.choice", "list"),
        ({"json_object": "yes"}, "structured_outputs.json_object", "true"),
        ({"regex": "a", "choice": ["b"]}, "structured_outputs", "exactly one"),
        ({"xml": "<a/>"}, "structured_outputs.xml", "unknown"),
        ("json", "structured_outputs", "object"),
    ],
)
def test_a_constraint_that_cannot_be_served_names_the_field(engine, value, field, words):
    with pytest.raises(InvalidRequestError) as info:
        engine.process_request_sync({"query": "q", "structured_outputs": value})
    assert info.value.field == field
    assert words in info.value.message


def test_a_grammar_is_compiled_once(engine):
    schema = {"type": "object", "properties": {"k": {"enum": ["once", "twice"]}}, "required": ["k"]}
    misses = GRAMMARS.misses
    hits = GRAMMARS.hits
    for _ in range(3):
        result = engine.process_request_sync({"query": "c", "structured_outputs": {"json": schema}})
        _valid(result, schema)
    assert GRAMMARS.misses == misses + 1
    assert GRAMMARS.hits == hits + 2


def test_the_constraint_keys_the_response_cache(demo_model):
    config = KVCacheConfig(model="demo", dtype="float32", default_max_new_tokens=20, response_cache=True)
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        free = engine.process_request_sync({"query": "Give me JSON"})
        constrained = engine.process_request_sync(
            {"query": "Give me JSON", "structured_outputs": {"json": PERSON}}
        )
        again = engine.process_request_sync({"query": "Give me JSON", "structured_outputs": {"json": PERSON}})
    assert constrained["result"] != free["result"]
    assert again["response_cached"] and again["result"] == constrained["result"]


def test_the_payload_carries_the_constraint():
    for value in (
        {"json": PERSON},
        {"json_object": True},
        {"regex": "a+"},
        {"choice": ["x", "y"]},
        {"grammar": 'start: "a"'},
    ):
        request = parse_request({"query": "q", "structured_outputs": value}, CONFIG)
        again = parse_request(request.to_payload(), CONFIG)
        assert again.params.constraint == request.params.constraint


def test_jump_forward_takes_forced_tokens_without_asking_the_model(demo_model):
    """The tokens a grammar forces (a schema's keys, its punctuation) are taken after each sampled
    one and computed with the next step's row: fewer steps for the same kind of answer, and every
    row's logits still those of its whole context computed from nothing (the forced tokens' KV is
    right)."""
    contexts: list[tuple[list[int], torch.Tensor]] = []

    def observe(seq, logits: torch.Tensor) -> None:
        # Called before the chosen token is taken: the context is everything the row has computed.
        contexts.append((seq.prompt_ids + seq.output_ids, logits.detach().clone().float()))

    steps = {}
    for jump in (False, True):
        config = dataclasses.replace(CONFIG, jump_forward=jump)
        with UltraAdaptiveKVCacheEngine(config, model=demo_model, logits_observer=observe) as engine:
            results = [
                engine.process_request_sync({"query": f"Person {i}", "structured_outputs": {"json": PERSON}})
                for i in range(3)
            ]
            steps[jump] = engine.get_stats()["batch"]["decode_steps"]
        for result in results:
            _valid(result, PERSON)
        if jump:
            for context, logits in contexts[-10:]:
                solo, _ = prefill(demo_model, context, None)
                allowed = torch.isfinite(logits)  # the observer sees the row after the grammar's mask
                assert torch.allclose(logits[allowed], solo.float()[allowed], atol=1e-4)
        contexts.clear()
    # `{"name": "`, `", "age": `, `, "tags": [` ...: forced, not decoded one step each.
    assert steps[True] < 0.8 * steps[False], steps
