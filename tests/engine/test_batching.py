"""Continuous batching through the real step loop (`LoopHarness`): requests join and leave
mid-stream, every row stays within 1e-4 of its solo run (bit-identical in batch-invariant mode),
prefix reuse is what it is at batch 1, KV stays within its budget, long prompts are chunked
between decode steps, priorities and cancellation hold."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulk.config import KVCacheConfig
from tests.engine.loop_harness import LoopHarness, Solo, solo

LETTERS = "abcdefghijklmnopqrstuvwxyz ,."


def _prompts(n: int, seed: int, length: tuple[int, int] = (20, 90)) -> list[str]:
    """`n` prompts whose first 16-token blocks all differ (a numbered tag first), so no request
    reuses another's KV unless a test wants it to."""
    rng = random.Random(seed)
    return [
        f"<{i:03d}> " + "".join(rng.choice(LETTERS) for _ in range(rng.randint(*length))) for i in range(n)
    ]


def _config(**overrides) -> KVCacheConfig:
    base = {
        "dtype": "float32",  # exact numerics: `auto` is bfloat16 on CPUs with bfloat16 instructions
        "response_cache": False,
        "max_tokens": 8192,
        "max_batch_size": 16,
        "prefill_chunk_tokens": 32,
    }
    return KVCacheConfig(**{**base, **overrides})


@pytest.mark.slow
def test_rows_match_their_solo_run_as_requests_join_and_leave(demo_model):
    config = _config()
    prompts = _prompts(20, seed=1, length=(10, 24))  # one 32-token chunk each: the batch fills fast
    rng = random.Random(2)
    params = [{"max_new_tokens": rng.randint(18, 36)} for _ in prompts]
    # Eight at once, eight more mid-stream, four when the batch is full: the batch grows to 16, and
    # shrinks as answers of different lengths finish, down to one.
    arrivals: dict[int, list] = {0: [], 6: [], 14: []}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        arrivals[0 if i < 8 else 6 if i < 16 else 14].append((prompt, p))
    harness = LoopHarness(demo_model, config)
    seqs = harness.run(arrivals)

    assert not harness.errors
    sizes = set(harness.batch_sizes)
    assert 1 in sizes and max(sizes) == 16 and len(sizes) >= 10, sorted(sizes)
    for seq in seqs:
        rid = seq.request.request_id
        expected = solo(demo_model, config, seq.request.query, **params[seqs.index(seq)])
        got = harness.results[rid]
        assert got["result"] == expected.result["result"]
        assert seq.output_ids == expected.token_ids
        batched_logits = harness.logits[rid]
        assert len(batched_logits) == len(expected.logits)
        for step, (a, b) in enumerate(zip(batched_logits, expected.logits, strict=True)):
            assert torch.allclose(a, b, atol=1e-4, rtol=0), f"{rid} step {step}: {(a - b).abs().max()}"


# Solo runs in batch-invariant mode, by (prompt index, seed): each computed once for the session.
_INVARIANT_PROMPTS = _prompts(10, seed=3, length=(30, 110))
_INVARIANT_CONFIG = _config(batch_invariant=True, max_batch_size=8)
_solo_runs: dict[tuple[int, int | None], Solo] = {}
MAX_NEW = 16


def _solo_invariant(lm, index: int, seed: int | None):
    key = (index, seed)
    if key not in _solo_runs:
        params = {"max_new_tokens": MAX_NEW}
        if seed is not None:
            params |= {"temperature": 0.9, "seed": seed}
        _solo_runs[key] = solo(lm, _INVARIANT_CONFIG, _INVARIANT_PROMPTS[index], **params)
    return _solo_runs[key]


request_plan = st.lists(
    st.tuples(
        st.integers(0, len(_INVARIANT_PROMPTS) - 1),  # which prompt
        st.integers(1, MAX_NEW),  # max_new_tokens
        st.integers(0, 12),  # arrival step
        st.sampled_from([None, None, 7]),  # greedy, or sampled with a seed
    ),
    min_size=2,
    max_size=8,
    unique_by=lambda r: r[0],
)


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=request_plan)
def test_batch_invariant_mode_is_bit_identical_to_the_solo_run(demo_model, plan):
    harness = LoopHarness(demo_model, _INVARIANT_CONFIG)
    arrivals: dict[int, list] = {}
    for index, max_new, at, seed in plan:
        params = {"max_new_tokens": max_new}
        if seed is not None:
            params |= {"temperature": 0.9, "seed": seed}
        arrivals.setdefault(at, []).append((_INVARIANT_PROMPTS[index], params))
    seqs = harness.run(arrivals)
    assert not harness.errors
    for seq in seqs:
        index = _INVARIANT_PROMPTS.index(seq.request.query)
        expected = _solo_invariant(demo_model, index, seq.params.seed)
        got_logits = harness.logits[seq.request.request_id]
        n = len(got_logits)
        # A shorter answer is the start of the longer one: same tokens, same bits at every step.
        assert n == min(seq.params.max_new_tokens, len(expected.logits))
        assert seq.output_ids == expected.token_ids[: len(seq.output_ids)]
        for a, b in zip(got_logits, expected.logits[:n], strict=True):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_prefix_reuse_reports_what_batch_1_reports(demo_model):
    system = "You are BUL, an assistant for business documents. Answer briefly and plainly.\n"
    questions = [f"Question {i}: a plan for product {i * 7}?" for i in range(10)]
    at_once = LoopHarness(demo_model, _config())
    batched = at_once.run({0: [(system + q, {"max_new_tokens": 12}) for q in questions]})
    one_by_one = LoopHarness(demo_model, _config(max_batch_size=1))
    sequential = one_by_one.run({0: [(system + q, {"max_new_tokens": 12}) for q in questions]})

    cached_batched = [at_once.results[s.request.request_id]["cached_tokens"] for s in batched]
    cached_sequential = [one_by_one.results[s.request.request_id]["cached_tokens"] for s in sequential]
    assert max(at_once.batch_sizes) > 1 and max(one_by_one.batch_sizes) == 1
    assert cached_batched == cached_sequential
    assert cached_batched[0] == 0 and all(c >= 64 for c in cached_batched[1:])


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plan=st.lists(
        st.tuples(st.integers(5, 60), st.integers(1, 16), st.integers(0, 12)), min_size=1, max_size=10
    ),
    budget=st.integers(100, 300),
)
def test_kv_in_use_never_exceeds_max_batch_tokens(demo_model, plan, budget):
    """Requests of random prompt and answer lengths arriving at random steps against a small KV
    budget: the running set's reservation stays within it at every step, and everyone is answered."""
    config = _config(max_batch_tokens=budget, max_batch_size=8)
    harness = LoopHarness(demo_model, config)
    arrivals: dict[int, list] = {}
    for i, (length, max_new, at) in enumerate(plan):
        prompt = f"<{i:03d}>" + "x" * length
        arrivals.setdefault(at, []).append((prompt, {"max_new_tokens": min(max_new, budget - length - 6)}))
    seqs = harness.run(arrivals)
    assert max(harness.kv_in_use) <= budget
    assert harness.kv_in_use[-1] == 0
    assert not harness.errors and len(harness.results) == len(seqs)


def test_a_long_prompt_is_chunked_between_decode_steps(demo_model):
    config = _config(prefill_chunk_tokens=32)
    harness = LoopHarness(demo_model, config)
    streams = [
        ("<s1> short question one", {"max_new_tokens": 80}),
        ("<s2> short question two", {"max_new_tokens": 80}),
    ]
    long_prompt = "<long> " + "".join(random.Random(5).choice(LETTERS) for _ in range(400))
    seqs = harness.run({0: streams, 6: [(long_prompt, {"max_new_tokens": 4})]})
    a, b, long_seq = (s.request.request_id for s in seqs)
    chunks = [(step, n) for step, rid, n in harness.chunks if rid == long_seq]
    first_long_token = next(step for step, kind, rid in harness.events if kind == "token" and rid == long_seq)
    assert sum(n for _, n in chunks) == 408  # its whole prompt: BOS + 407 characters
    assert len(chunks) > 408 // 32 and all(0 < n <= 32 for _, n in chunks)  # in chunks, none too big
    steps = [step for step, _ in chunks]
    assert steps == list(range(steps[0], steps[0] + len(steps)))  # one chunk every step
    for stream in (a, b):
        got = [s for s, kind, rid in harness.events if kind == "token" and rid == stream]
        # Each running stream got a token at every step of the long prefill.
        assert len([s for s in got if steps[0] <= s < first_long_token]) >= len(steps) - 1


def test_a_prompt_alone_runs_in_one_forward(demo_model):
    harness = LoopHarness(demo_model, _config(prefill_chunk_tokens=32))
    harness.run({0: [("<alone> " + "y" * 300, {"max_new_tokens": 2})]})
    assert [kind for _, kind, _ in harness.events].count("prefill") == 1


def test_a_waiting_higher_priority_request_is_admitted_first(demo_model):
    harness = LoopHarness(demo_model, _config(max_batch_size=1))
    seqs = harness.run(
        {
            0: [("<blocker> hold the only slot", {"max_new_tokens": 10})],
            2: [
                ("<low> one", {"max_new_tokens": 2, "priority": 1}),
                ("<high> two", {"max_new_tokens": 2, "priority": 9}),
                ("<mid> three", {"max_new_tokens": 2, "priority": 5}),
                ("<low2> four", {"max_new_tokens": 2, "priority": 1}),
            ],
        }
    )
    first_prefill = {}
    for step, kind, rid in harness.events:
        if kind == "prefill":
            first_prefill.setdefault(rid, step)
    order = sorted(seqs[1:], key=lambda s: first_prefill[s.request.request_id])
    assert [s.request.query.split()[0] for s in order] == ["<high>", "<mid>", "<low>", "<low2>"]


def test_a_cancelled_request_frees_its_slot_at_the_next_step(demo_model):
    harness = LoopHarness(demo_model, _config(max_batch_size=1))
    long_one = harness.submit("<long> keep going", max_new_tokens=500)
    waiting = harness.submit("<next> then me", max_new_tokens=3)
    for _ in range(5):
        harness.step()
    assert harness.loop.scheduler.running == [long_one]
    long_one.cancel()
    harness.step()
    assert harness.results[long_one.request.request_id]["finish_reason"] == "cancelled"
    assert harness.loop.scheduler.running == [waiting]
    harness.run()
    assert harness.results[waiting.request.request_id]["completion_tokens"] == 3
    assert harness.kv_in_use[-1] == 0
    # The cancelled request's blocks were stored: its prompt is reusable.
    again = harness.run({harness.steps: [("<long> keep going", {"max_new_tokens": 1})]})
    assert harness.results[again[0].request.request_id]["cached_tokens"] == 16
