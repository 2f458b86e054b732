"""Smoke test of `bul bench serve`: the quick settings start every server (real uvicorn processes):
the chat section's on the default model (`auto`: the real model where its wheel is installed), driven
through the chat API, then the demo model's, driven through the completions API, all over real
sockets; transformers' generate_batch runs in its own process; the results are complete.

No timing assertions: the machine running the tests is noisy."""

import json

from bench import serve


def test_quick_run_writes_every_server_and_workload(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BUL_DTYPE", "float32")  # the servers' dtype, pinned (they read BUL_* settings)
    assert serve.main(["--quick", "--out", str(tmp_path)]) == 0

    data = json.loads((tmp_path / "serve-latest.json").read_text())
    assert (tmp_path / "serve-latest.png").stat().st_size > 10_000
    assert data["benchmark"] == "serve" and data["options"]["model"] == "demo"
    servers = data["servers"]
    assert set(servers) == {"ours", "batch1", "invariant"}
    for name in ("ours", "batch1"):
        server = servers[name]
        assert set(server["distinct"]) == {str(c) for c in serve.QUICK["concurrency"]}
        for figures in server["distinct"].values():
            assert figures["tokens_per_s"] > 0 and figures["requests_sent"] > 0
            assert figures["ttft_p50_ms"] > 0 and figures["itl_p50_ms"] > 0
        shared = server["shared"]
        assert shared["requests_completed"] == serve.QUICK["shared_requests"]
        assert 0 < shared["token_hit_rate"] < 1  # the system prompts are reused, the questions are not
        long = server["long"]
        assert long["long_prompt_tokens"] == serve.QUICK["long_prompt_tokens"]
        assert long["streams_itl_p50_ms"] > 0 and long["itl_p99_over_p50"] >= 1
        assert server["peak_rss_mib"] > 100 and server["server_stats"]["errors"] == 0
    assert servers["batch1"]["server_stats"]["batch"]["max_batch_size"] == 1
    assert servers["ours"]["server_stats"]["batch"]["mean_size"] > 1
    assert servers["invariant"]["server_stats"]["batch"]["batch_invariant"] is True
    hf = data["generate_batch"]
    assert hf["prompts"] == serve.QUICK["generate_batch_prompts"] and hf["tokens_per_s"] > 0
    assert set(data["verdicts"]) >= {"scaling_16_over_1", "ours_over_generate_batch", "long_itl_p99_over_p50"}

    chat = data["chat"]
    for kind in ("short", "long"):
        assert set(chat[kind]) == {str(c) for c in serve.QUICK["chat_concurrency"]}
        for figures in chat[kind].values():
            assert figures["tokens_per_s"] > 0 and figures["ttft_p50_ms"] > 0
            assert figures["mean_batch"] >= 1 and figures["decode_steps"] > 0
    assert chat["shared"]["requests_completed"] == serve.QUICK["chat_shared_requests"]
    assert chat["shared"]["token_hit_rate"] > 0  # the system prompts are reused
    assert chat["chat"]["requests_completed"] == serve.QUICK["chat_clients"] * serve.QUICK["chat_turns"]
    assert chat["cold"]["prompt_tokens_per_s"] > 0 and chat["server_stats"]["errors"] == 0
    assert set(data["verdicts"]) >= {"chat_short_scaling_16_over_1", "chat_long_scaling_16_over_1"}

    out = capsys.readouterr().out
    assert (
        "Chat traffic" in out
        and "Distinct prompts" in out
        and "Targets" in out
        and "batch_invariant tokens/s" in out
    )
