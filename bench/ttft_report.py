"""The `bul bench ttft` report: scenario labels, the issue's targets, and the tables."""

from __future__ import annotations

from typing import Any

from bench.common import format_table

# The question scenario: a new question of this many tokens after a cached prefix (the Q).
QUESTION_TOKENS = 32

SCENARIOS = {
    "cold": "cold prefill (ours)",
    "full_hit": "full-prefix hit (ours)",
    "half_hit": "50% prefix hit (ours)",
    "hf_generate": "HF generate(), no reuse",
    "hf_deepcopy": "HF deep-copy prefix + generate()",
    "hf_forward": "plain HF forward (miss baseline)",
    "limit": "limit estimate (copy + 1-token fwd)",
    "limit_copy": "  copy of the reused KV",
    "limit_forward": "  one-token forward on N-1 cached",
    "question": f"cached prefix + {QUESTION_TOKENS}-token question (ours)",
    "limit_question": "question limit (copy + fwd of rest)",
    "limit_question_copy": "  copy of the reused prefix KV",
    "limit_question_forward": "  forward of the rest on the reused",
}

# Targets, checked at the largest length: (key, ratio key, description, comparison, threshold).
TARGETS = (
    ("full_hit_speedup", "cold_over_full_hit", "full hit: cold / full-hit TTFT", ">=", 30.0),
    ("full_hit_vs_limit", "full_hit_over_limit", "full hit: full-hit TTFT / limit", "<=", 2.0),
    ("miss_overhead", "miss_overhead_pct", "miss: cold over plain HF forward, %", "<=", 5.0),
    ("shared_prefix", "half_hit_over_deepcopy", "shared prefix: ours 50% / HF deep-copy", "<=", 1.0),
    ("question_vs_limit", "question_over_limit", "prefix + question: TTFT / limit", "<=", 1.5),
)


def target_rows(results: list[Any]) -> list[dict[str, Any]]:
    largest = results[-1]
    ratios = largest.ratios()
    rows = []
    for key, ratio_key, description, op, threshold in TARGETS:
        value = ratios[ratio_key]
        met = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        rows.append(
            {
                "target": key,
                "description": description,
                "length": largest.length,
                "value": value,
                "op": op,
                "threshold": threshold,
                "met": met,
            }
        )
    return rows


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.1f}{unit}" if abs(value) >= 10 or unit == " %" else f"{value:.2f}{unit}"


def render(results: list[Any], targets: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    lengths = [str(r.length) for r in results]
    medians = [r.medians() for r in results]
    title = (
        f"TTFT, median of {settings['runs']} runs (ms): model {settings['model']} ({settings['dtype']}), "
        f"{settings['threads']} torch threads, block size {settings['block_size']}"
    )
    rows = [[SCENARIOS[key], *(f"{m[key]:.1f}" for m in medians)] for key in SCENARIOS]
    rows.append(["reused tokens: full hit", *(str(r.cached_tokens["full_hit"]) for r in results)])
    rows.append(["reused tokens: 50% hit", *(str(r.cached_tokens["half_hit"]) for r in results)])
    rows.append(["reused tokens: question", *(str(r.cached_tokens["question"]) for r in results)])
    first = format_table(["scenario", *lengths], rows, title)

    by_ratio = {t["target"]: t for t in targets}
    ratio_rows = []
    specs = [
        ("cold / full hit (x)", "cold_over_full_hit", "", "full_hit_speedup"),
        ("full hit / limit (x)", "full_hit_over_limit", "", "full_hit_vs_limit"),
        ("cold vs plain forward", "miss_overhead_pct", " %", "miss_overhead"),
        ("ours 50% / HF deep-copy (x)", "half_hit_over_deepcopy", "", "shared_prefix"),
        ("HF generate / plain forward (x)", "hf_generate_over_forward", "", None),
        ("question / its limit (x)", "question_over_limit", "", "question_vs_limit"),
    ]
    all_ratios = [r.ratios() for r in results]
    for label, ratio_key, unit, target_key in specs:
        target = by_ratio.get(target_key) if target_key else None
        ratio_rows.append(
            [
                label,
                *(_fmt(r[ratio_key], unit) for r in all_ratios),
                f"{target['op']} {target['threshold']:g}{unit}" if target else "",
                ("PASS" if target["met"] else "MISS") if target else "",
            ]
        )
    second = format_table(["ratio", *lengths, "target", f"at {results[-1].length}"], ratio_rows)
    met = sum(t["met"] for t in targets)
    summary = [f"targets met at {results[-1].length} tokens: {met} of {len(targets)}"]
    summary += [
        f"  {'PASS' if t['met'] else 'MISS'}  {t['description']}: {_fmt(t['value'])} "
        f"(target {t['op']} {t['threshold']:g})"
        for t in targets
    ]
    return "\n\n".join([first, second, "\n".join(summary)])
