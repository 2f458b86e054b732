"""Logprobs on the engine (the request field `logprobs`: the chosen token's log-probability and that
many alternatives): computed from the very row each token was chosen from (the logits observer sees
it), greedy and sampled, streamed, and only for the rows that ask, which get the same tokens as
without them, alone or inside a batch."""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict

import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.result import LOGPROBS_FIELD, RESULT_FIELDS
from tests.conftest import ENDS_EARLY

PROMPTS = [ENDS_EARLY, "Summarise the report", "Write a haiku about rain", "List three colours", "Hello"]


@pytest.fixture(scope="module")
def observed() -> dict[str, list[torch.Tensor]]:
    """Per request id, a copy of each row its tokens were chosen from."""
    return defaultdict(list)


@pytest.fixture(scope="module")
def engine(demo_model, observed):
    def observe(seq, logits: torch.Tensor) -> None:
        observed[seq.request.request_id].append(logits.detach().clone().float())

    config = KVCacheConfig(model="demo", dtype="float32", response_cache=False, default_max_new_tokens=8)
    with UltraAdaptiveKVCacheEngine(config, model=demo_model, logits_observer=observe) as engine:
        yield engine


def _check(result: dict, rows: list[torch.Tensor], top: int, greedy: bool) -> None:
    entries = result[LOGPROBS_FIELD]
    assert len(entries) == result["completion_tokens"] == len(rows)
    assert "".join(entry["token"] for entry in entries) == result["result"]  # ASCII bytes here
    for entry, row in zip(entries, rows, strict=True):
        expected = torch.log_softmax(row, dim=-1)
        token = entry["token_id"]
        assert entry["logprob"] == pytest.approx(float(expected[token]), abs=1e-5)
        assert entry["bytes"] == list(entry["token"].encode())
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == top
        values = [a["logprob"] for a in alternatives]
        assert values == sorted(values, reverse=True)
        assert [a["token_id"] for a in alternatives] == expected.topk(top).indices.tolist()
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
        if greedy:
            assert alternatives[0]["token_id"] == token == int(torch.argmax(row))


async def test_greedy_logprobs_are_those_of_the_rows_the_tokens_were_chosen_from(engine, observed):
    request = {"query": ENDS_EARLY, "max_new_tokens": 8, "logprobs": 5, "request_id": "greedy"}
    result = await engine.process_request(request)
    _check(result, observed["greedy"], 5, greedy=True)
    plain = await engine.process_request({"query": ENDS_EARLY, "max_new_tokens": 8})
    assert plain["result"] == result["result"] and LOGPROBS_FIELD not in plain
    assert tuple(plain) == RESULT_FIELDS  # an answer without logprobs has no such field


async def test_sampled_logprobs_too_and_zero_alternatives(engine, observed):
    request = {"query": ENDS_EARLY, "max_new_tokens": 8, "temperature": 1.0, "seed": 3, "logprobs": 0}
    result = await engine.process_request({**request, "request_id": "sampled"})
    _check(result, observed["sampled"], 0, greedy=False)
    again = await engine.process_request({**request, "logprobs": None})
    assert again["result"] == result["result"]


async def test_a_row_with_logprobs_inside_a_batch_gets_the_tokens_it_gets_alone(engine, observed):
    alone = [await engine.process_request({"query": p, "max_new_tokens": 8}) for p in PROMPTS]
    before = engine.get_stats()["batch"]
    batch = await asyncio.gather(
        *(
            engine.process_request(
                {
                    "query": p,
                    "max_new_tokens": 8,
                    **({"logprobs": 3, "request_id": "in-batch"} if i == 2 else {}),
                }
            )
            for i, p in enumerate(PROMPTS)
        )
    )
    after = engine.get_stats()["batch"]
    # They did share steps: more decode rows than decode steps.
    assert after["decode_rows"] - before["decode_rows"] > after["decode_steps"] - before["decode_steps"]
    assert [r["result"] for r in batch] == [r["result"] for r in alone]
    assert [LOGPROBS_FIELD in r for r in batch] == [i == 2 for i in range(len(PROMPTS))]
    _check(batch[2], observed["in-batch"], 3, greedy=True)


async def test_a_stream_carries_each_tokens_logprobs(engine):
    request = {"query": ENDS_EARLY, "max_new_tokens": 8, "logprobs": 2}
    events = [event async for event in engine.stream_request(request)]
    final = events[-1]
    streamed = [entry for event in events[:-1] for entry in event[LOGPROBS_FIELD]]
    assert streamed == final[LOGPROBS_FIELD][: len(streamed)]
    assert [e["token"] for e in streamed] == [e["token"] for e in final[LOGPROBS_FIELD]]
    assert "".join(event["token"] for event in events[:-1]) == final["result"]


async def test_answers_with_logprobs_are_not_cached(demo_model):
    config = KVCacheConfig(model="demo", dtype="float32", default_max_new_tokens=4)
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        request = {"query": ENDS_EARLY, "logprobs": 1}
        first, second = [await engine.process_request(request) for _ in range(2)]
        assert not second["response_cached"] and second["result"] == first["result"]
        # The second reuses the first's prompt KV (a prefix-cache hit): the same numbers up to float
        # rounding, not necessarily to the bit.
        for a, b in zip(first[LOGPROBS_FIELD], second[LOGPROBS_FIELD], strict=True):
            assert a["token_id"] == b["token_id"] and a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
        # A cached plain answer does not answer a request for logprobs either.
        await engine.process_request({"query": "cached first"})
        answer = await engine.process_request({"query": "cached first", "logprobs": 0})
        assert not answer["response_cached"] and len(answer[LOGPROBS_FIELD]) == 4
