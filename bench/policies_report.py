"""The `bul bench policies` report: policy labels, the issue's targets, the tables and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import format_table

# The policies of the tables and the plot, in order (the libCacheSim LRU/LFU cross-check is not one).
POLICIES = {
    "lru": "LRU (ours)",
    "lfu": "LFU (ours)",
    "adaptive": "ADAPTIVE (ours)",
    "arc": "ARC (libCacheSim)",
    "s3fifo": "S3-FIFO (libCacheSim)",
    "wtinylfu": "W-TinyLFU (libCacheSim)",
    "belady": "Belady (libCacheSim)",
}
REFERENCES = ("arc", "s3fifo", "wtinylfu")
COST_LIMIT = 3.0  # ADAPTIVE's cost per access at most 3x LRU's


def _pp(a: float | None, b: float | None) -> float | None:
    """a - b in percentage points."""
    return None if a is None or b is None else (a - b) * 100.0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def gaps(trace: dict[str, Any]) -> dict[str, list[Any]]:
    """Per capacity: the best reference, ADAPTIVE minus it and ADAPTIVE minus Bélády (pp)."""
    ratios = trace["hit_ratio"]
    best_name, to_best, to_belady = [], [], []
    for i in range(len(trace["capacities"])):
        present = [(ratios[p][i], p) for p in REFERENCES if ratios[p][i] is not None]
        best = max(present) if present else (None, None)
        best_name.append(best[1])
        to_best.append(_pp(ratios["adaptive"][i], best[0]))
        to_belady.append(_pp(ratios["adaptive"][i], ratios["belady"][i]))
    return {
        "best_reference": best_name,
        "adaptive_minus_best_reference_pp": to_best,
        "adaptive_minus_belady_pp": to_belady,
    }


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, checked on these results, plus the gaps and the LRU/LFU cross-check."""
    per_trace = {}
    adaptive_all, arc_all = [], []
    cost: dict[str, list[float]] = {}
    agree = checked = 0
    for name, trace in results.items():
        ratios = trace["hit_ratio"]
        margins = [
            _pp(a, max(lru, lfu))
            for a, lru, lfu in zip(ratios["adaptive"], ratios["lru"], ratios["lfu"], strict=True)
        ]
        worst = min(range(len(margins)), key=margins.__getitem__)
        per_trace[name] = {
            "adaptive_ge_max_lru_lfu": all(m >= -1e-9 for m in margins),
            "margin_pp": margins,
            "worst_capacity": trace["capacities"][worst],
            "worst_margin_pp": margins[worst],
            **gaps(trace),
        }
        for a, arc in zip(ratios["adaptive"], ratios["arc"], strict=True):
            adaptive_all.append(a)
            arc_all.append(arc)
        for policy, values in trace["ns_per_access"].items():
            cost.setdefault(policy, []).extend(v for v in values if v is not None)
        flat = trace["flat_hit_ratio"]
        for ours, theirs in (("lru", "lcs-lru"), ("lfu", "lcs-lfu")):
            for a, b in zip(flat[ours], flat[theirs], strict=True):
                checked += 1
                agree += abs(a - b) < 1e-9
    mean_cost = {p: _mean(v) for p, v in cost.items()}
    cost_ratio = mean_cost["adaptive"] / mean_cost["lru"]
    mean_adaptive, mean_arc = _mean(adaptive_all), _mean(arc_all)
    return {
        "per_trace": per_trace,
        "adaptive_ge_max_lru_lfu_everywhere": all(t["adaptive_ge_max_lru_lfu"] for t in per_trace.values()),
        "mean_hit_ratio": {"adaptive": mean_adaptive, "arc": mean_arc, "cells": len(adaptive_all)},
        "adaptive_mean_ge_arc": mean_adaptive >= mean_arc - 1e-12,
        "mean_ns_per_access": mean_cost,
        "cost_ratio_adaptive_over_lru": cost_ratio,
        "cost_within_limit": cost_ratio <= COST_LIMIT,
        "cost_limit": COST_LIMIT,
        "lru_lfu_match_libcachesim": {"agree": agree, "checked": checked},
    }


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def render(results: dict[str, dict[str, Any]], summary: dict[str, Any], settings: dict[str, Any]) -> str:
    blocks = []
    for name, trace in results.items():
        caps = trace["capacities"]
        metric = trace["metric"]
        size = f"{trace['accesses']} accesses" + (
            f", {trace['requests']} requests" if trace["requests"] is not None else ""
        )
        title = f"{name}: {trace['description']}\n  {metric} (%) by cache size in blocks; {size}"
        rows = []
        for policy, label in POLICIES.items():
            if policy == "belady" and trace["kv_prefix"]:
                label = "Belady, flat keys (upper ref.)"
            ns = [v for v in trace["ns_per_access"][policy] if v is not None]
            cost = f"{sum(ns) / len(ns):.0f}" if ns else "-"
            rows.append([label, *(_pct(v) for v in trace["hit_ratio"][policy]), cost])
        g = summary["per_trace"][name]
        rows.append(
            ["ADAPTIVE - best ref (pp)", *(_signed(v) for v in g["adaptive_minus_best_reference_pp"]), ""]
        )
        rows.append(
            ["  best ref", *(POLICIES[p].split(" ")[0] if p else "-" for p in g["best_reference"]), ""]
        )
        rows.append(["ADAPTIVE - Belady (pp)", *(_signed(v) for v in g["adaptive_minus_belady_pp"]), ""])
        headers = ["policy", *(f"c={c}" for c in caps), "ns/access"]
        blocks.append(format_table(headers, rows, title))

    rows = []
    for name, t in summary["per_trace"].items():
        rows.append(
            [
                f"{name}: ADAPTIVE >= max(LRU, LFU) at every size",
                _verdict(t["adaptive_ge_max_lru_lfu"]),
                f"worst {t['worst_margin_pp']:+.2f} pp at c={t['worst_capacity']}",
            ]
        )
    mean = summary["mean_hit_ratio"]
    rows.append(
        [
            f"mean hit ratio over {mean['cells']} (trace, size): ADAPTIVE >= ARC",
            _verdict(summary["adaptive_mean_ge_arc"]),
            f"{_pct(mean['adaptive'])} % vs {_pct(mean['arc'])} % "
            f"({_signed(_pp(mean['adaptive'], mean['arc']))} pp)",
        ]
    )
    ns = summary["mean_ns_per_access"]
    rows.append(
        [
            f"cost: ADAPTIVE / LRU ns per access <= {summary['cost_limit']:.0f}x (same run)",
            _verdict(summary["cost_within_limit"]),
            f"{summary['cost_ratio_adaptive_over_lru']:.2f}x ({ns['adaptive']:.0f} / {ns['lru']:.0f} ns)",
        ]
    )
    check = summary["lru_lfu_match_libcachesim"]
    rows.append(
        [
            "cross-check: ours LRU, LFU == libCacheSim's (flat keys)",
            _verdict(check["agree"] == check["checked"]),
            f"{check['agree']}/{check['checked']} cells identical",
        ]
    )
    blocks.append(format_table(["target", "result", "figures"], rows, "Summary"))

    cost_rows = [[POLICIES.get(p, p), f"{v:.0f}"] for p, v in ns.items() if v is not None]
    blocks.append(
        format_table(
            ["policy", "ns/access"],
            cost_rows,
            f"Mean cost per access (ours: Python simulate(), median of {settings['repeats']} runs; "
            "libCacheSim: inside C, context only)",
        )
    )
    return "\n\n".join(blocks)


def plot(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Hit ratio against cache size, one subplot per trace, one line per policy; written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    n = len(results)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    styles = {"lru": ":", "lfu": ":", "adaptive": "-", "belady": "--"}
    for ax, (name, trace) in zip(axes.flat, results.items(), strict=False):
        caps = trace["capacities"]
        for policy, label in POLICIES.items():
            points = [(c, v) for c, v in zip(caps, trace["hit_ratio"][policy], strict=True) if v is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            width = 2.5 if policy == "adaptive" else 1.2
            ax.plot(xs, ys, styles.get(policy, "-."), marker="o", markersize=3, linewidth=width, label=label)
        if caps[-1] >= 4 * caps[0]:  # log scale where the sizes span a wide range
            ax.set_xscale("log")
        ax.set_xticks(caps, [str(c) for c in caps])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(name + (" (token hit ratio)" if trace["kv_prefix"] else ""), fontsize=9)
        ax.set_xlabel("cache size (blocks)", fontsize=8)
        ax.set_ylabel("hit ratio", fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.93, bottom=0.1 + 0.05 / rows, hspace=0.45, wspace=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
