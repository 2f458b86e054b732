"""The tables and the plot of `bul bench serve`."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import gemm
from bench.common import format_table

LABELS = {"ours": "ours", "batch1": "ours, max_batch_size=1", "invariant": "ours, batch_invariant"}


VERDICT_LABELS = {
    "chat_short_scaling_16_over_1": "chat, real model, short answers: 16 clients / 1 client tok/s (x)",
    "chat_long_scaling_16_over_1": "chat, real model, long answers: 16 clients / 1 client tok/s (x)",
    "scaling_16_over_1": "demo: ours 16 clients / 1 client tok/s (x)",
    "ours_over_generate_batch": "demo: ours 16 clients / generate_batch tok/s (x)",
    "long_itl_p99_over_p50": "demo: long prefill: streams' ITL p99 / p50 (x)",
    "shared_hit_rate_points": "demo: shared: token hit rate, |ours - batch 1| (points)",
}


def render(result: dict[str, Any]) -> str:
    parts = []
    if "chat" in result:
        parts.append(render_chat(result["options"], result["chat"]))
    if "servers" in result:
        parts.append(render_demo(result))
    parts.append(render_verdicts(result["verdicts"]))
    return "\n\n".join(parts)


def render_chat(options: Mapping[str, Any], chat: Mapping[str, Any]) -> str:
    """The chat section: one row per workload and level."""
    rows = []

    def row(label: str, f: Mapping[str, Any]) -> list[Any]:
        hit = f.get("token_hit_rate")
        return [
            label,
            f["tokens_per_s"],
            _ttft(f, "p50"),
            _ttft(f, "p95"),
            f["itl_p50_ms"],
            f["itl_p99_ms"],
            None if f.get("mean_batch") is None else round(f["mean_batch"], 1),
            None if hit is None else hit * 100,
            f["requests_completed"],
        ]

    long_low, long_high = options["long_tokens"] // 2, options["long_tokens"] * 3 // 2
    names = {
        "short": f"short answers (<= {options['short_tokens']})",
        "long": f"long answers ({long_low}-{long_high})",
    }
    for kind, label in names.items():
        for clients, f in chat.get(kind, {}).items():
            rows.append(row(f"{label}, {clients} client{'s' if clients != '1' else ''}", f))
    rows.append(
        row(
            f"shared: {options['chat_system_prompts']} system prompts, {chat['shared']['clients']} clients",
            chat["shared"],
        )
    )
    rows.append(row(f"multi-turn chats, {chat['chat']['clients']} clients", chat["chat"]))
    rows.append(row(f"cold prompt (~{options['cold_tokens']} tokens), 1 client", chat["cold"]))
    resolved = chat.get("resolved", {})
    table = format_table(
        ["chat traffic", "tok/s", "TTFT p50", "TTFT p95", "ITL p50", "ITL p99", "batch", "hit %", "done"],
        rows,
        f"Chat traffic (/v1/chat/completions), {resolved.get('model', options['chat_model'])} "
        f"({resolved.get('dtype')}, weights {resolved.get('weight_quantization')}), "
        f"distinct ~{options['question_tokens']}-token questions, {options['chat_seconds']:g} s per level "
        "(times in ms; batch: mean decode batch)",
    )
    lines = [table]
    short = [f for f in itertools.chain(*(chat.get(k, {}).values() for k in ("short", "long")))]
    if any(f.get("forced_short") for f in short):
        lines.append(
            "WARNING: some forced answers ended before their length (the server ignored ignore_eos / "
            "min_tokens): the long answers' figures are not what they say"
        )
    if "roof" in chat:
        lines.append(gemm.describe({"ours": chat["roof"]}, chat.get("gemm")))
    for kind, label in names.items():
        bound = prompt_bound(chat.get(kind, {}).get("1"))
        if bound is not None:
            share, ceiling = bound
            lines.append(
                f"  {label}: one client spends about {share:.0%} of its time on prompts (TTFT p50 "
                f"x requests); with every decode step free, more clients could reach at most about "
                f"{ceiling:.1f}x its tokens/s while the prompts share the server's threads"
            )
    return "\n".join(lines)


def prompt_bound(one_client: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """(the share of one client's time spent waiting for first tokens, the scaling that share
    allows): N clients' prompts still run one after another on the same threads, so however well
    their decoding batches, N clients' tokens/s can be at most 1 / share of one client's. An
    estimate from the figures: the window is tokens / tokens/s, the prompts' time TTFT p50 times the
    completed requests."""
    if not one_client:
        return None
    tps, ttft, done = (
        one_client.get("tokens_per_s"),
        one_client.get("ttft_p50_ms"),
        one_client.get("requests_completed"),
    )
    if not tps or not ttft or not done:
        return None
    window = one_client["tokens"] / tps
    share = min(1.0, done * ttft / 1000 / window)
    return share, 1 / share


def render_verdicts(verdicts: Mapping[str, Any]) -> str:
    rows = []
    for key, label in VERDICT_LABELS.items():
        if key not in verdicts:
            continue
        check = verdicts[key]
        value = check["value"]
        bound = (">= " if check["at_least"] else "<= ") + f"{check['target']:g}"
        rows.append(
            [label, None if value is None else round(value, 2), bound, "PASS" if check["met"] else "MISS"]
        )
    out = format_table(["target", "value", "target", "verdict"], rows, "Targets")
    if "invariant_tokens_per_s_ratio" in verdicts:
        cost = ", ".join(
            f"{c} clients: {r * 100:.0f} % of ours"
            for c, r in verdicts["invariant_tokens_per_s_ratio"].items()
            if r is not None
        )
        out += f"\n\nbatch_invariant tokens/s: {cost or '-'}"
    return out


def render_demo(result: dict[str, Any]) -> str:
    options, servers = result["options"], result["servers"]
    hf = result["generate_batch"]
    parts = []

    rows = []
    for name, server in servers.items():
        for clients, f in server.get("distinct", {}).items():
            rows.append(
                [
                    f"{LABELS[name]}, {clients} clients",
                    f["tokens_per_s"],
                    _ttft(f, "p50"),
                    _ttft(f, "p95"),
                    f["itl_p50_ms"],
                    f["itl_p99_ms"],
                    f["requests_completed"],
                ]
            )
    rows.append(
        [
            f"generate_batch, {hf['prompts']} prompts, {options['generate_batch_concurrency']} at a time",
            hf["tokens_per_s"],
            None,
            None,
            None,
            None,
            hf["prompts"],
        ]
    )
    parts.append(
        format_table(
            ["distinct prompts", "tok/s", "TTFT p50", "TTFT p95", "ITL p50", "ITL p99", "done"],
            rows,
            f"Distinct prompts of {options['prompt_chars']} tokens, answers of {options['max_tokens'] // 2}-"
            f"{options['max_tokens'] * 3 // 2} tokens, "
            f"{options['seconds']:.0f} s per level (model {options['model']}; times in ms)",
        )
    )

    rows = []
    for name in ("ours", "batch1"):
        f = servers[name]["shared"]
        hit = f["token_hit_rate"]
        rows.append(
            [
                LABELS[name],
                f["tokens_per_s"],
                f["ttft_p50_ms"],
                f["ttft_p95_ms"],
                None if hit is None else hit * 100,
            ]
        )
    parts.append(
        format_table(
            ["shared prefixes", "tok/s", "TTFT p50", "TTFT p95", "token hit %"],
            rows,
            f"{options['system_prompts']} system prompts of {options['system_chars']} tokens, "
            f"{options['shared_requests']} questions from {options['shared_clients']} clients",
        )
    )

    rows = []
    for name in ("ours", "batch1"):
        f = servers[name]["long"]
        rows.append(
            [
                LABELS[name],
                f["long_prompt_ttft_ms"],
                f["streams_itl_p50_ms"],
                f["streams_itl_p99_ms"],
                f["streams_itl_max_during_prefill_ms"],
            ]
        )
    parts.append(
        format_table(
            ["long prompt", "its TTFT", "streams ITL p50", "ITL p99", "max ITL in prefill"],
            rows,
            f"A {options['long_prompt_tokens']}-token prompt arriving while "
            f"{options['long_streams']} streams decode",
        )
    )

    rows = [[LABELS[name], server.get("peak_rss_mib")] for name, server in servers.items()]
    rows.append(["generate_batch", hf.get("peak_rss_mib")])
    parts.append(format_table(["process", "peak RSS MiB"], rows, "Peak memory"))

    return "\n\n".join(parts)


def _ttft(figures: dict[str, Any], which: str) -> str | None:
    value = figures[f"ttft_{which}_ms"]
    if value is None:
        return None
    return (">" if figures[f"ttft_{which}_censored"] else "") + f"{value:.1f}"


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = result["servers"]
    fig, (throughput, itl, timeline) = plt.subplots(1, 3, figsize=(16, 4.8))
    for name, server in servers.items():
        levels = sorted(server.get("distinct", {}), key=int)
        x = [int(c) for c in levels]
        throughput.plot(
            x, [server["distinct"][c]["tokens_per_s"] for c in levels], marker="o", label=LABELS[name]
        )
        itl.plot(x, [server["distinct"][c]["itl_p50_ms"] for c in levels], marker="o", label=LABELS[name])
    throughput.axhline(
        result["generate_batch"]["tokens_per_s"], color="grey", linestyle="--", label="generate_batch"
    )
    throughput.set(
        xscale="log", xlabel="concurrent clients", ylabel="completion tokens/s", title="Throughput"
    )
    itl.set(xscale="log", xlabel="concurrent clients", ylabel="ms", title="Inter-token latency p50")
    for ax in (throughput, itl):
        ax.set_xticks([int(c) for c in result["options"]["concurrency"]])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=8)
    line = servers["ours"]["long"]["timeline"]
    for tokens in line["streams"]:
        times = [t - line["start"] for t in tokens]
        gaps = [(b - a) * 1000 for a, b in itertools.pairwise(tokens)]
        timeline.plot(times[1:], gaps, linewidth=0.8)
    timeline.axvspan(
        line["long_sent"] - line["start"], line["long_first_token"] - line["start"], color="orange", alpha=0.2
    )
    timeline.set(
        xlabel="s",
        ylabel="inter-token latency, ms",
        title="Streams while a long prompt is prefilled (shaded)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
