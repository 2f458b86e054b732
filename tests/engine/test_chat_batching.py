"""Chat traffic through the step loop: requests rendered through a chat template start with the same
header (its system turn), and sharing it must not make them queue behind each other.

A tiny Llama with a chat template of its own (`chat_model`, tests/conftest.py), float32, stepped by
`LoopHarness`: every interleaving is reproducible. What is checked: distinct chat questions arriving
together decode as one batch; a long uncached system prompt shared by two requests is computed
once, the second starting as soon as the first has computed the shared blocks (before the first's
prompt is done, and long before its answer is); a cached header costs no wait; and every answer is
its solo run's."""

from __future__ import annotations

import random

import torch

from bulk.config import KVCacheConfig
from bulk.engine import scheduler
from tests.engine.loop_harness import LoopHarness, solo

# Long enough (about 150 tokens of the tiny tokenizer, whose context is 512) that waiting for it
# beats computing it twice whatever this machine measures.
LONG_SYSTEM = "You answer questions about the bakery on Rue Oberkampf, its opening hours and breads. " * 2
SHORT_SYSTEM = "You are terse."
# Distinct questions in words the tiny tokenizer knows (other characters are all one unknown token).
_WORDS = [
    "What",
    "is",
    "the",
    "capital",
    "of",
    "France",
    "Paris",
    "You",
    "are",
    "terse",
    "Create",
    "marketing",
]
_rng = random.Random(5)
QUESTIONS = [" ".join(_rng.choice(_WORDS) for _ in range(14)) + "?" for _ in range(16)]


def _config(system_prompt: str, **overrides) -> KVCacheConfig:
    base = {
        "dtype": "float32",
        "response_cache": False,
        "max_batch_size": 32,
        "prefill_chunk_tokens": 32,
        "system_prompt": system_prompt,
    }
    return KVCacheConfig(**{**base, **overrides})


def _first_step(harness: LoopHarness, kind: str) -> dict[str, int]:
    first: dict[str, int] = {}
    for step, event, rid in harness.events:
        if event == kind:
            first.setdefault(rid, step)
    return first


def test_distinct_chat_questions_decode_as_one_batch_and_wait_on_no_cached_header(chat_model, monkeypatch):
    # A step's prompt budget large enough for all sixteen: what is checked is that none waits.
    monkeypatch.setattr(scheduler, "PREFILL_STEP_TOKENS", 4096)
    config = _config(SHORT_SYSTEM)
    harness = LoopHarness(chat_model, config)
    # An earlier question: the template's header (its system turn) is cached now.
    harness.run({0: [("Paris", {"max_new_tokens": 2})]})
    header = len(chat_model.tokenizer.encode(f"<|system|>{SHORT_SYSTEM}\n<|user|>"))
    header -= header % harness.prefix.block_size  # its full blocks
    steps_before = harness.steps
    seqs = harness.run({harness.steps: [(q, {"max_new_tokens": 24, "ignore_eos": True}) for q in QUESTIONS]})

    assert not harness.errors
    assert len({s.block_hashes[1] for s in seqs}) == 16  # distinct after the header's block
    started = _first_step(harness, "prefill")
    # All sixteen started their prefill in the step they arrived: none waited for another.
    assert {started[s.request.request_id] for s in seqs} == {steps_before}
    assert all(harness.results[s.request.request_id]["cached_tokens"] >= header for s in seqs)
    assert max(harness.batch_sizes) >= 12
    for seq in seqs[:4]:
        alone = solo(chat_model, config, seq.request.query, max_new_tokens=24, ignore_eos=True)
        got = harness.logits[seq.request.request_id]
        assert seq.output_ids == alone.token_ids
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, alone.logits, strict=True))


def test_a_long_shared_system_prompt_is_computed_once_and_the_second_request_does_not_queue(chat_model):
    """A decoding request keeps the prompt budget small (a chunk a step), so the first request's
    prompt takes many steps. The second, arriving a step later with the same system prompt, waits
    for the first's blocks rather than computing them again (how long it waits, and that a cached
    prefix costs no wait, `tests/engine/test_scheduler.py` pins down), and decodes long before the
    first's answer is done."""
    config = _config(LONG_SYSTEM)
    harness = LoopHarness(chat_model, config)
    system_tokens = len(chat_model.tokenizer.encode(f"<|system|>{LONG_SYSTEM}\n"))
    shared_blocks = system_tokens // harness.prefix.block_size
    assert shared_blocks >= 8
    long_question = "Tell me everything about the sourdough, the rye and the croissants. " * 2
    filler = harness.submit("Keep talking", raw=True, max_new_tokens=300, ignore_eos=True)
    harness.step()  # the filler's prompt; from now on it decodes beside the prompts
    first = harness.submit(long_question, max_new_tokens=60, ignore_eos=True)
    harness.step()
    second = harness.submit("And on Sundays?", max_new_tokens=8, ignore_eos=True)
    arrived = harness.steps
    harness.run()

    assert not harness.errors
    rid_first, rid_second = first.request.request_id, second.request.request_id
    computed = {rid: 0 for rid in (rid_first, rid_second)}
    for _, rid, take in harness.chunks:
        if rid in computed:
            computed[rid] += take
    result = harness.results[rid_second]
    assert result["cached_tokens"] >= shared_blocks * harness.prefix.block_size  # computed once
    assert computed[rid_second] == result["prompt_tokens"] - result["cached_tokens"]
    assert computed[rid_first] == harness.results[rid_first]["prompt_tokens"]
    started = _first_step(harness, "prefill")
    tokens = _first_step(harness, "token")
    assert started[rid_second] > arrived  # it waited for the first's blocks
    finished_first = max(step for step, kind, rid in harness.events if rid == rid_first)
    assert tokens[rid_second] < finished_first  # decoding long before the first's answer is done
    assert filler.request.request_id in harness.results
    alone = solo(chat_model, config, second.request.query, max_new_tokens=8, ignore_eos=True)
    assert second.output_ids == alone.token_ids
    got = harness.logits[rid_second]
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, alone.logits, strict=True))
