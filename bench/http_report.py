"""The table `bul bench http` prints."""

from __future__ import annotations

from typing import Any

from bench.common import format_table


def render(result: dict[str, Any]) -> str:
    options = result["options"]
    rows = []
    for index, pair in enumerate(result["rounds"], start=1):
        for name in ("bare", "cached"):
            r = pair[name]
            label = "bare FastAPI constant" if name == "bare" else "/api/query (response cache)"
            rows.append(
                [f"round {index}: {label}", r["rps"], r["p50_ms"], r["p99_ms"], r["requests"], r["errors"]]
            )
    title = (
        f"HTTP throughput, {options['clients']} concurrent clients, "
        f"{options['seconds']:.1f} s per server per round "
        f"(model {result['model']})"
    )
    table = format_table(["server", "requests/s", "p50 ms", "p99 ms", "requests", "errors"], rows, title)
    ratio = result["throughput_ratio"]
    verdict = "-" if ratio is None else f"{ratio * 100:.1f} %"
    met = "meets" if result["meets_target"] else "misses"
    return (
        f"{table}\n\ncached / bare throughput (median of per-round ratios): {verdict} "
        f"({met} the {result['target'] * 100:.0f} % target)"
    )
