"""The pure parts shared by `bul bench serve` and `bul bench peers`: the requests' bodies, reading
their streams (ours and vLLM's), the figures, the mean decode batch from `/api/stats`, the chat
traffic, and the GEMM roof. Offline: streams come from an in-process transport."""

import itertools
import json

import httpx
import pytest

from bench import chat_traffic, gemm, serve_chat, serve_report
from bench.common import cpu_summary
from bench.quality import load_corpus
from bench.serve_load import Request, Stream, as_request, figures, mean_batch, prefill_rate, stream_request

SMOLLM2_CONFIG = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def text():
    return load_corpus()


def test_request_bodies_raw_chat_and_forced():
    raw = as_request(("Once upon", 8))
    assert raw.path == "/v1/completions" and not raw.chat
    body = raw.body()
    assert body["prompt"] == "Once upon" and body["max_tokens"] == 8 and "messages" not in body
    assert body["temperature"] == 0 and body["stream"] is True and body["model"] == "bench"
    assert body["stream_options"]["include_usage"] is True
    assert "ignore_eos" not in body and "min_tokens" not in body

    chat = Request(256, messages=(("system", "Be brief."), ("user", "Hi")), forced=True)
    assert chat.path == "/v1/chat/completions"
    body = chat.body("m")
    assert body["model"] == "m" and "prompt" not in body
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"] == 256


def _sse(chunks):
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def _delta(content, usage=None):
    chunk = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


async def _read(body, request):
    transport = httpx.MockTransport(lambda r: httpx.Response(200, text=body))
    out = []
    async with httpx.AsyncClient(transport=transport) as http:
        await stream_request(http, "http://test", request, "c0", out)
    return out[0]


async def test_a_chat_stream_as_ours_sends_it_one_token_a_chunk():
    usage = {"prompt_tokens": 40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 16}}
    body = _sse(
        [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None},
            _delta("Hel", None),
            _delta("lo", None),
            _delta("!", None),
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "usage": None},
            {"choices": [], "usage": usage},
        ]
    )
    stream = await _read(body, Request(3, messages=(("user", "Hi"),)))
    assert stream.finished and len(stream.tokens) == 3 and stream.counts == [1, 1, 1]
    assert (stream.prompt_tokens, stream.cached_tokens, stream.completion_tokens) == (40, 16, 3)


async def test_a_vllm_stream_that_merged_tokens_counts_each_token():
    """vLLM's running usage (`continuous_usage_stats`) says how many tokens a merged chunk holds."""

    def running(n):
        return {"prompt_tokens": 40, "completion_tokens": n, "total_tokens": 40 + n}

    body = _sse(
        [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": running(0)},
            _delta("A", running(1)),
            _delta("BCD", running(4)),  # three tokens in one chunk: its client fell behind
            _delta("E", running(5)),
            {"choices": [], "usage": {**running(5), "prompt_tokens_details": None}},
        ]
    )
    stream = await _read(body, Request(5, messages=(("user", "x"),)))
    assert stream.counts == [1, 3, 1] and stream.completion_tokens == 5 and stream.cached_tokens is None


async def test_an_error_answer_fails_the_workload():
    transport = httpx.MockTransport(lambda r: httpx.Response(422, json={"error": "bad"}))
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(RuntimeError, match="422"):
            await stream_request(http, "http://test", Request(4, prompt="x"), "c0", [])


def test_gaps_and_tokens_per_token_and_inside_the_window():
    s = Stream("a", sent=0.0, tokens=[1.0, 1.1, 1.4, 1.5], counts=[1, 1, 3, 1], completion_tokens=6)
    assert s.gaps() == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1])  # the merged chunk: 3 gaps of 0.1
    assert s.gaps(1.2, 2.0) == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert s.arrived() == 6  # not finished: the chunks' counts
    s.finished = True
    assert s.arrived() == 6 and s.arrived(0.0, 1.45) == 5  # cut by the window: counted by chunk
    assert Stream("b", 0.0).arrived() == 0 and s.ttft == 1.0


def test_figures_flag_forced_answers_that_stopped_early():
    done = {"finished": True, "prompt_tokens": 100, "cached_tokens": 50, "max_tokens": 4, "forced": True}
    full = Stream("a", 0.0, tokens=[0.5, 0.6, 0.7, 0.8], counts=[1] * 4, completion_tokens=4, **done)
    short = Stream("b", 0.0, tokens=[0.5, 0.6], counts=[1, 1], completion_tokens=2, **done)
    waiting = Stream("c", 0.2)  # no token yet at the end: its TTFT is a lower bound
    # No usage in its stream (llama-cpp-python): judged by its chunks.
    no_usage = Stream("d", 0.0, tokens=[0.5], counts=[1], max_tokens=4, forced=True, finished=True)
    assert figures([no_usage], 0.0, 1.0)["forced_short"] == 1
    f = figures([full, short, waiting], 0.0, 1.0)
    assert f["tokens"] == 6 and f["tokens_per_s"] == pytest.approx(6.0) and f["tokens_per_chunk"] == 1.0
    assert f["forced_short"] == 1 and f["requests_completed"] == 2 and f["prompt_tokens_mean"] == 100
    assert f["token_hit_rate"] == pytest.approx(0.5)
    assert f["ttft_p95_censored"] and f["ttft_p95_ms"] == pytest.approx(800.0)


def test_mean_decode_batch_is_the_difference_of_two_stats_readings():
    before = {"batch": {"decode_steps": 100, "decode_rows": 150, "mean_size": 1.5}}
    after = {"batch": {"decode_steps": 300, "decode_rows": 2550, "mean_size": 9.0}}
    assert mean_batch(before, after) == {"decode_steps": 200, "decode_rows": 2400, "mean_batch": 12.0}
    assert mean_batch(after, after)["mean_batch"] is None  # no decode step in between


def test_prefill_rate_is_the_median_of_uncached_prompt_tokens_over_ttft():
    assert prefill_rate([(1000, 0, 0.5), (1000, 200, 0.4), (900, None, 0.3)]) == pytest.approx(2000.0)
    assert prefill_rate([(None, None, None), (10, 0, None)]) is None


def test_chat_traffic_shapes(text):
    # Distinct questions: numbered first, a passage, a question; about 200 tokens (4.2 chars each).
    questions = [chat_traffic.question(text, i) for i in range(50)]
    assert len(set(questions)) == 50 and all(
        q.startswith(f"Question {i + 1}.") for i, q in enumerate(questions)
    )
    assert all(600 < len(q) < 1000 for q in questions)
    a = chat_traffic.distinct_requests(text, 3, 32, salt=1)
    assert a == chat_traffic.distinct_requests(text, 3, 32, salt=1)
    assert not set(a) & set(chat_traffic.distinct_requests(text, 3, 32, salt=2))
    # Each turn of a chat extends the one before by the scripted answer and a new question.
    for earlier, later in itertools.pairwise([chat_traffic.chat_turn(2, t, 32) for t in range(4)]):
        assert later.messages[: len(earlier.messages)] == earlier.messages
        assert later.messages[len(earlier.messages) :][0] == ("assistant", chat_traffic.CHAT_ANSWER)
        assert later.messages[-1][0] == "user"
    turns = chat_traffic.multi_turn_requests(3, 2, 8)
    assert [len(r.messages) for r in turns] == [2, 2, 2, 4, 4, 4]  # turn 0 of every chat first


def test_parameters_roof_and_its_description():
    assert gemm.llama_parameters(SMOLLM2_CONFIG) == gemm.SMOLLM2_135M_PARAMETERS == 134_515_008
    assert gemm.embedding_parameters(SMOLLM2_CONFIG) == 49152 * 576  # 28.3M: a lookup in prefill
    untied = gemm.llama_parameters({**SMOLLM2_CONFIG, "tie_word_embeddings": False})
    assert untied - gemm.SMOLLM2_135M_PARAMETERS == 49152 * 576
    measured = {
        "shape": [512, 576, 1536],
        "threads": 2,
        "repeats": 5,
        "float32": {"gflops": 100.0},
        "bfloat16": {"gflops": 800.0},
    }
    r = gemm.roof(1000.0, 100_000_000, measured, embedding=20_000_000)
    assert r["implied_gflops"] == pytest.approx(200.0) and r["gemm_gflops"] == pytest.approx(160.0)
    assert r["fraction_of_gemm"] == {"float32": pytest.approx(2.0), "bfloat16": pytest.approx(0.25)}
    assert r["gemm_fraction_of_gemm"] == {"float32": pytest.approx(1.6), "bfloat16": pytest.approx(0.2)}
    assert gemm.roof(None, 1, measured)["implied_gflops"] is None
    text = gemm.describe({"ours": {"prompt_tokens_per_s": 1000.0, **r}, "vLLM": {}}, measured)
    assert (
        "F.linear (512, 576) x (576, 1536), 2 threads, best of 5: float32 100 GFLOP/s, bfloat16 800" in text
    )
    assert "ours: cold prompt 1000 prompt tokens/s = 200.0 GFLOP/s at 2 x 100.0M parameters" in text
    assert "(200 % of float32, 25 % of bfloat16)" in text
    assert "GEMMs alone (2 x 80.0M, the embedding table is a lookup): 160.0 GFLOP/s (160 % of float32" in text
    assert "vLLM: cold prompt not measured" in text


def test_gemm_measure_runs_at_a_small_shape():
    out = gemm.measure(1, shape=(8, 16, 32), dtypes=("float32",), repeats=2, calls=2)
    assert out["shape"] == [8, 16, 32] and out["float32"]["gflops"] > 0 and "bfloat16" not in out


def test_cpu_summary_names_the_model_and_the_kernels_flags():
    info = "processor: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile sse\n"
    assert cpu_summary(info) == {
        "model_name": "Intel(R) Xeon(R)",
        "flags": ["avx2", "avx512f", "amx_tile", "amx_bf16"],
    }
    assert cpu_summary("") == {"model_name": None, "flags": []}


def test_chat_scaling_verdicts():
    def level(tps, forced_short=0):
        return {"tokens_per_s": tps, "forced_short": forced_short}

    chat = {
        "short": {"1": level(40.0), "4": level(100.0), "16": level(200.0), "32": level(250.0)},
        "long": {"1": level(50.0), "16": level(300.0, forced_short=3)},
    }
    v = serve_chat.chat_verdicts(chat)
    assert v["chat_short_scaling_16_over_1"]["value"] == pytest.approx(5.0)
    assert v["chat_short_scaling_16_over_1"]["met"] and v["chat_short_scaling_16_over_1"]["levels"] == [
        "1",
        "16",
    ]
    # 6x, but answers stopped before their forced length: not met.
    assert v["chat_long_scaling_16_over_1"]["value"] == pytest.approx(6.0)
    assert not v["chat_long_scaling_16_over_1"]["met"]
    # A quick run stops below 16 clients: its largest level.
    quick = serve_chat.chat_verdicts({"short": {"1": level(10.0), "4": level(30.0)}})
    assert quick["chat_short_scaling_16_over_1"]["levels"] == ["1", "4"]


def test_the_prompt_bound_on_scaling_from_one_clients_figures():
    """One client waiting 240 ms for each of 33 first tokens in a 15 s window spends about half its
    time on prompts, which N clients still run one after another: at most about 1.9x."""
    one = {"tokens_per_s": 49.5, "tokens": 742, "ttft_p50_ms": 240.0, "requests_completed": 33}
    share, ceiling = serve_report.prompt_bound(one)
    assert share == pytest.approx(33 * 0.240 / (742 / 49.5))
    assert ceiling == pytest.approx(1 / share) and 1.8 < ceiling < 2.0
    assert serve_report.prompt_bound({**one, "requests_completed": 0}) is None
    assert serve_report.prompt_bound(None) is None
