"""The pure parts of `bul bench structured`'s comparison with vLLM: its schemas and prompts, the
request each becomes, how an answer is read and how a server's answers are counted. (Running it needs
vLLM, installed on first use: never part of `make test`.)"""

import json
import re

import jsonschema
import pytest

from bench import structured
from bench.structured_schemas import SCHEMAS

BY_NAME = {entry["name"]: entry for entry in SCHEMAS}


def test_every_schema_is_a_valid_json_schema_with_a_name_and_a_prompt():
    assert 35 <= len(SCHEMAS) <= 50
    for entry in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(entry["schema"])
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", entry["name"])  # OpenAI's json_schema.name
        assert entry["prompt"].strip() and entry["keywords"]
    assert len(BY_NAME) == len(SCHEMAS)
    assert len({entry["prompt"] for entry in SCHEMAS}) == len(SCHEMAS)
    # What the brief asks to cover, each at least once somewhere in a schema.
    text = json.dumps([entry["schema"] for entry in SCHEMAS])
    for keyword in (
        '"$ref"',
        '"$defs"',
        '"anyOf"',
        '"minItems"',
        '"maxItems"',
        '"pattern"',
        '"format": "date"',
        '"format": "email"',
        '"format": "uri"',
        '"additionalProperties": false',
        '"not"',
        '"if"',
        '"then"',
        '"else"',
        '"dependentRequired"',
        '"patternProperties"',
        '"uniqueItems"',
        '"contains"',
    ):
        assert keyword in text, keyword


def test_the_request_of_a_schema():
    entry = BY_NAME["invoice"]
    body = structured.chat_body(entry, 256)
    assert body["messages"] == [{"role": "user", "content": entry["prompt"]}]
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "invoice", "schema": entry["schema"], "strict": True},
    }
    assert body["temperature"] == 0 and body["max_tokens"] == 256 and body["stream"] is False


SENTIMENT = BY_NAME["sentiment"]


def answer(content, finish="stop", tokens=10):
    return {
        "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 30, "completion_tokens": tokens, "total_tokens": 30 + tokens},
    }


@pytest.fixture
def records():
    valid = json.dumps({"sentiment": "mixed", "confidence": 0.8})
    invalid = json.dumps({"sentiment": "angry", "confidence": 0.8})  # not in the enum
    return [
        structured.record(SENTIMENT, 200, answer(valid, tokens=12), 2.0),
        structured.record(SENTIMENT, 200, answer(invalid, tokens=8), 1.0),
        structured.record(SENTIMENT, 200, answer('{"sentiment": "pos', "length", 256), 5.0),
        structured.record(
            SENTIMENT,
            422,
            {"error": {"message": "response_format.json_schema.schema: cannot be served: not"}},
            0.01,
        ),
        structured.record(SENTIMENT, 500, {"error": {"message": "internal error (KeyError)"}}, 0.02),
    ]


def test_a_record_reads_the_answer(records):
    ok, bad, cut, refused, broken = records
    assert ok["valid"] is True and ok["finish_reason"] == "stop" and ok["completion_tokens"] == 12
    assert bad["valid"] is False and "angry" in bad["invalid"] and bad["invalid"].startswith("sentiment:")
    assert cut["finish_reason"] == "length" and "valid" not in cut  # unfinished: not judged
    assert refused["status"] == 422 and refused["message"].endswith("cannot be served: not")
    assert broken["message"] == "internal error (KeyError)"


def test_the_tally_counts_each_kind(records):
    t = structured.tally(records)
    assert t["sent"] == 5 and t["answered"] == 3 and t["refused"] == 1 and t["server_errors"] == 1
    assert t["no_answer"] == 0 and t["finished"] == 2 and t["length"] == 1 and t["valid"] == 1
    # Completion tokens / wall time over the answered requests only.
    assert t["completion_tokens"] == 12 + 8 + 256 and t["seconds"] == pytest.approx(8.0)
    assert t["tokens_per_s"] == pytest.approx(276 / 8.0)
    assert structured.tally([])["tokens_per_s"] is None


def test_error_messages_in_each_shape_and_validity_without_formats():
    assert structured.error_message({"error": {"message": "m1"}}) == "m1"
    assert structured.error_message({"object": "error", "message": "m2", "code": 400}) == "m2"
    assert structured.error_message({"detail": "m3"}) == "m3"
    assert structured.error_message("plain text") == "plain text"
    assert structured.error_message({}) == ""
    # The format checker is off: a date that is not one still validates (an annotation only).
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}}
    assert structured.check(schema, '{"d": "not a date"}') is None
    assert structured.check(schema, "{").startswith("not JSON")
    assert structured.check(schema, None) == "no content"
    # A recursive $ref is followed: the nested node's kind is checked.
    tree = BY_NAME["file_tree"]["schema"]
    node = {"name": "src", "kind": "folder", "children": [{"name": "a.py", "kind": "file"}]}
    assert structured.check(tree, json.dumps(node)) is None
    node["children"][0]["kind"] = "link"
    assert structured.check(tree, json.dumps(node)).startswith("children/0/kind:")


def test_the_ratio_over_schemas_both_answered(records):
    ok, bad, cut, refused, broken = records
    theirs = [ok, refused, {**cut, "seconds": 2.5}, bad, broken]  # answered 0, 2, 3
    # Both answered: indices 0 and 2. Ours: 12 + 256 tokens in 7 s; theirs: 12 + 256 in 4.5 s.
    assert structured.both_answered_rate(records, theirs) == pytest.approx((268 / 7.0) / (268 / 4.5))


def test_the_report_names_refusals_and_invalid_answers(records):
    result = {
        "schemas": [{"name": f"s{i}", "keywords": []} for i in range(5)],
        "max_tokens": 256,
        "validation": "jsonschema Draft 2020-12, format checker off",
        "vllm_build": {"version": "0.32.0"},
        "servers": {
            "ours": {"records": records, "tally": structured.tally(records)},
            "vllm": {"records": records, "tally": structured.tally(records)},
        },
        "tokens_per_s_ratio": 1.0,
        "tokens_per_s_ratio_both_answered": 1.0,
    }
    text = structured.render_peers(result)
    assert "1 / 2 (50 %)" in text and "cannot be served: not" in text and "INVALID 8t" in text
    assert "length 256t" in text and "1.00x" in text
    assert structured.render_peers({"skipped": "vLLM install failed: x"}).startswith("peers: not run")
