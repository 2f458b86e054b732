"""This machine's GEMM FLOP/s at a prompt chunk's shape, and how far a server's prefill is from it.

A prompt is prefilled as GEMMs: about 2 x parameters FLOPs per prompt token (each weight is
multiplied and added once per token; attention over the prompt adds a little more, the LM head,
which runs for the last position only, a little less). A cold prompt's tokens/s thus implies a
FLOP/s, which set beside what `torch` reaches on one large GEMM of the same model shows how far the
prefill is from the machine's roof: SmolLM2-135M's MLP up-projection on a 512-token chunk,
(512, 576) x (576, 1536), in float32 and bfloat16 (which runs on AMX or AVX512-BF16 where the CPU has
them), best of a few repetitions.

The measure runs in a process of its own (`measure_in_child`) with the threads the server gets, so
that it sees the same OpenMP setup as the server and not the benchmark's passive waiting.

    python -m bench.gemm [--threads 2]      # prints the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from bench import child_env
from bench.common import ratio

log = logging.getLogger("bench.gemm")

# (tokens, in features, out features): a 512-token prompt chunk through SmolLM2-135M's up-projection.
SHAPE = (512, 576, 1536)
DTYPES = ("float32", "bfloat16")
# SmolLM2-135M-Instruct's parameters (tied embeddings counted once), when its config is not at hand.
SMOLLM2_135M_PARAMETERS = 134_515_008


def measure(
    threads: int,
    shape: Sequence[int] = SHAPE,
    dtypes: Sequence[str] = DTYPES,
    repeats: int = 5,
    calls: int = 20,
) -> dict[str, Any]:
    """GFLOP/s of `F.linear` at `shape` per dtype: the best of `repeats` timings of `calls` calls."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    m, k, n = shape
    flops = 2.0 * m * k * n
    out: dict[str, Any] = {"shape": list(shape), "threads": threads, "repeats": repeats, "calls": calls}
    generator = torch.Generator().manual_seed(0)
    for name in dtypes:
        dtype = getattr(torch, name)
        x = torch.randn(m, k, generator=generator).to(dtype)
        w = torch.randn(n, k, generator=generator).to(dtype)
        with torch.inference_mode():
            for _ in range(3):  # first calls: allocations, the kernel's choice
                F.linear(x, w)
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                for _ in range(calls):
                    F.linear(x, w)
                best = min(best, (time.perf_counter() - started) / calls)
        out[name] = {"ms": best * 1000, "gflops": flops / best / 1e9}
    return out


def measure_in_child(threads: int, timeout: float = 300) -> dict[str, Any] | None:
    """`measure` in a process of its own with `threads` OpenMP threads; None when it fails (the
    figures are an aside: a benchmark goes on without them)."""
    command = [sys.executable, "-m", "bench.gemm", "--threads", str(threads)]
    try:
        answer = subprocess.run(
            command,
            env=child_env({"OMP_NUM_THREADS": str(threads)}),
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
        )
        return json.loads(answer.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("the GEMM measure failed: %s", exc)
        return None


def named_model_parameters(model: str) -> tuple[int, int] | None:
    """(parameters, embedding parameters) of a named real model, from the config of the folder our
    server converts its GGUF file into; None for the demo models (no roof is worked out for them)."""
    from bench.common import named_model_folder
    from bulk import named_models

    if not named_models.is_named(model):
        return None
    config = json.loads((named_model_folder(model) / "config.json").read_text())
    return llama_parameters(config), embedding_parameters(config)


def llama_parameters(config: Mapping[str, Any]) -> int:
    """The parameters of a Llama-architecture model from its Hugging Face `config.json`: embeddings,
    each layer's attention and MLP projections and norms, the final norm, and an LM head unless tied."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    vocab, inter = config["vocab_size"], config["intermediate_size"]
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * inter
    layer = attention + mlp + 2 * hidden
    head = 0 if config.get("tie_word_embeddings", False) else vocab * hidden
    return vocab * hidden + layers * layer + hidden + head


def embedding_parameters(config: Mapping[str, Any]) -> int:
    """The input embedding table's parameters: a lookup, not a GEMM, for each prompt token (and
    when the LM head is tied to it, the head runs for a prompt's last position only)."""
    return int(config["vocab_size"]) * int(config["hidden_size"])


def roof(
    prompt_tokens_per_s: float | None,
    parameters: int,
    gemm: Mapping[str, Any] | None,
    embedding: int = 0,
) -> dict[str, Any]:
    """The FLOP/s a prefill at `prompt_tokens_per_s` implies, 2 x `parameters` per token, and its
    fraction of the measured GEMM FLOP/s per dtype; and the same for the GEMMs alone, 2 x
    (`parameters` - `embedding`) per token, since the embedding table is looked up, not multiplied
    (28.3M of SmolLM2-135M's 134.5M)."""

    def gflops(count: int) -> float | None:
        return None if prompt_tokens_per_s is None else 2.0 * count * prompt_tokens_per_s / 1e9

    def fractions(value: float | None) -> dict[str, float | None]:
        if not gemm:
            return {}
        return {name: ratio(value, gemm[name].get("gflops")) for name in DTYPES if name in gemm}

    implied, in_gemms = gflops(parameters), gflops(parameters - embedding)
    return {
        "parameters": parameters,
        "embedding_parameters": embedding,
        "implied_gflops": implied,
        "fraction_of_gemm": fractions(implied),
        "gemm_gflops": in_gemms,
        "gemm_fraction_of_gemm": fractions(in_gemms),
    }


def describe(roofs: Mapping[str, Mapping[str, Any]], gemm: Mapping[str, Any] | None) -> str:
    """Lines for a report: the GEMM roof, then each side's cold prompt tokens/s, the GFLOP/s it
    implies and its fraction of the roof (`roofs`: side -> `roof(...)` plus `prompt_tokens_per_s`)."""
    if gemm:
        m, k, n = gemm["shape"]
        head = f"GEMM roof, F.linear ({m}, {k}) x ({k}, {n}), {gemm['threads']} threads, "
        head += f"best of {gemm.get('repeats', '?')}: "
        head += ", ".join(f"{name} {gemm[name]['gflops']:.0f} GFLOP/s" for name in DTYPES if name in gemm)
    else:
        head = "GEMM roof: not measured"
    lines = [head]

    def percent(fractions: Mapping[str, float | None]) -> str:
        return ", ".join(f"{f * 100:.0f} % of {name}" for name, f in fractions.items() if f is not None)

    for side, r in roofs.items():
        tps, implied = r.get("prompt_tokens_per_s"), r.get("implied_gflops")
        if tps is None or implied is None:
            lines.append(f"  {side}: cold prompt not measured (no prompt token count in its stream)")
            continue
        line = (
            f"  {side}: cold prompt {tps:.0f} prompt tokens/s = {implied:.1f} GFLOP/s at 2 x "
            f"{r['parameters'] / 1e6:.1f}M parameters a token"
        )
        if r.get("fraction_of_gemm"):
            line += f" ({percent(r['fraction_of_gemm'])})"
        if r.get("embedding_parameters"):
            line += (
                f"; GEMMs alone (2 x {(r['parameters'] - r['embedding_parameters']) / 1e6:.1f}M, the "
                f"embedding table is a lookup): {r['gemm_gflops']:.1f} GFLOP/s"
            )
            if r.get("gemm_fraction_of_gemm"):
                line += f" ({percent(r['gemm_fraction_of_gemm'])})"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gemm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sys.stdout.write(json.dumps(measure(args.threads, repeats=args.repeats)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
