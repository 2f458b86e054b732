"""`bul bench models`: the decode step and prefix reuse of each model family, ours against transformers'.

Each family is built from transformers' own configuration class with random weights at one shape,
SmolLM2-135M's by default (hidden 576, 30 layers, 9 heads over 3 KV heads, head_dim 64, MLP 1536,
vocabulary 49,152, tied embeddings), in the dtype the engine's `dtype="auto"` picks
(`bulk.models.loader.resolve_dtype`: bfloat16 on a CPU with bfloat16 instructions, else float32):

  llama            plain Llama
  mistral          Mistral without a sliding window
  qwen2            Qwen2, its q/k/v biases made non-zero (their initialisation leaves them at zero)
  qwen3            Qwen3, its per-head q/k norms (not all ones), head_dim 64
  phi3             Phi-3: fused q/k/v and gate/up projections
  smollm3          SmolLM3: every fourth layer without rotary embedding (its default)
  gemma2           Gemma 2: sliding window 512 on alternate layers, attention and final soft-capping
  gemma3           Gemma 3: sliding window 512, 5 sliding layers to 1 full (`layer_types`)
  mistral-sliding  Mistral with a sliding window of 512 on every layer

Per family, in a process of its own (the caller's OpenMP wait policy, `child_env`; one thread drives
torch, so no spinning team steals the cores from the other side):

(a) Decode step milliseconds at 1 and 16 rows over `context` (256) cached tokens per row. Ours: the
    engine's own `ModelRunner.forward` over a pool, as `bul serve` runs it (the plain step where
    `bulk.models.llama_step.build` takes the family, the native decode attention, our attention),
    timed as `bench.decode` times it: the rows' prompts in one forward, then the same decode step
    over the same context again and again (each step rewrites the KV at the same position).
    Theirs: a deep copy of the same model taken before our runner switched it to our attention
    (`batched_attention.enable`), so it keeps the attention transformers picked (sdpa or eager,
    reported): `model(input_ids (rows, 1), past_key_values=DynamicCache of `context` tokens a row,
    use_cache=True)`, the cache restored from a copy after every step (outside the timing). The four
    (side, rows) steps are interleaved, their order reversed every round, median of `steps` rounds
    after one warmup. Throughput ratio at 16 rows = (16 / ours) / (16 / theirs) = theirs / ours.
(b) Prefix reuse: an engine (`UltraAdaptiveKVCacheEngine(model=...)`, response cache off) answers,
    each round, a fresh `prompt`-token prompt (stored), then a prompt sharing its first `shared`
    tokens (the reuse side: its TTFT and `cached_tokens`) and a fresh prompt of the same length with
    nothing to share (the cold side), the last two in alternating order; one token each (`ttft_ms`,
    the engine's own). Medians over `rounds` rounds after a warmup round; ratio = cold / reuse.

The byte tokenizer turns the prompts into tokens (one a byte); its ids are valid in any of these
vocabularies and the cost of a step does not depend on which tokens it reads.

With `--weights int4` (or int8) each model is quantized as the loader quantizes it for
`weight_quantization` (`loader.quantize_for_serving`, bfloat16 activations) before transformers'
copy is taken, so both sides multiply the same quantized weights through the same kernels and the
ratio is the path around them: ours then decodes through the native decode layers
(`plain+native`), one C++ call a step for every family.

    python -m bench.models [--families llama,gemma2] [--steps 8] [--rounds 3] [--threads 2]
    python -m bench.models --weights int4   # quantized as `make run` serves: the native layers
    python -m bench.models --native-layers off   # the plain step's Python loop for decode rows
    python -m bench.models --quick      # a tiny shape, two families: the smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

from bench import child_env
from bench.common import format_table, median, options_from, ratio, write_results

log = logging.getLogger("bench.models")

NAME = "models"
FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "smollm3",
    "gemma2",
    "gemma3",
    "mistral-sliding",
)
# Shapes a family is built at: SmolLM2-135M's, and a tiny one for the tests.
SHAPES: dict[str, dict[str, int]] = {
    "smollm2-135m": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "vocab_size": 512,
        "max_position_embeddings": 2048,
    },
}
WINDOW = 512  # the sliding window of gemma2, gemma3 and mistral-sliding
TARGET_RATIO = 1.5  # our 16-row decode throughput against transformers'

DEFAULTS: dict[str, Any] = {
    "shape": "smollm2-135m",
    "families": list(FAMILIES),
    "dtype": "auto",
    "rows": [1, 16],
    "context": 256,
    "steps": 8,
    "prompt": 512,
    "shared": 448,
    "rounds": 3,
    "threads": 2,
    "weights": "none",
    "native_layers": True,
}
QUICK: dict[str, Any] = {
    **DEFAULTS,
    "shape": "tiny",
    "families": ["llama", "gemma3"],
    "context": 32,
    "steps": 3,
    "prompt": 128,
    "shared": 96,
    "rounds": 2,
}


# ---- the models ------------------------------------------------------------------------------


def build_model(family: str, shape: str = "smollm2-135m", dtype: Any = None, seed: int = 0) -> Any:
    """A random-weight transformers causal LM of `family` at `shape` (a key of SHAPES), in inference
    mode, in `dtype` (default float32)."""
    import torch
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        SmolLM3Config,
        SmolLM3ForCausalLM,
    )

    dims = dict(SHAPES[shape])
    layers = dims["num_hidden_layers"]
    common = {**dims, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif family == "mistral-sliding":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=WINDOW))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
        with torch.no_grad():  # their initialisation leaves the biases at zero
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.02)
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
        with torch.no_grad():  # norms that change something: not all ones
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.uniform_(0.5, 1.5)
    elif family == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**common, sliding_window=None))
    elif family == "smollm3":
        model = SmolLM3ForCausalLM(SmolLM3Config(**common))
    elif family == "gemma2":
        alternate = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        config = Gemma2Config(
            **common, sliding_window=WINDOW, layer_types=alternate, query_pre_attn_scalar=dims["head_dim"]
        )
        model = Gemma2ForCausalLM(config)
    elif family == "gemma3":
        five_to_one = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
        config = Gemma3TextConfig(
            **common, sliding_window=WINDOW, layer_types=five_to_one, query_pre_attn_scalar=dims["head_dim"]
        )
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(f"no family {family!r} (one of {', '.join(FAMILIES)})")
    return model.to(dtype or torch.float32).train(False)


def loaded_model(family: str, shape: str, dtype: Any) -> Any:
    """`build_model`'s model as the loader would hand it to an engine (on the CPU, the byte
    tokenizer), as `tests/tiny_hf_model.py` builds its tiny ones."""
    import torch

    from bulk.models import hf_cache
    from bulk.models.loader import LoadedModel
    from bulk.models.tokenizer import ByteTokenizer

    model = build_model(family, shape, dtype)
    cfg = model.config
    return LoadedModel(
        name=f"bench-{family}",
        model=model,
        tokenizer=ByteTokenizer(),
        fingerprint=f"bench-{family}-{shape}:random-seed-0",
        device=torch.device("cpu"),
        dtype=dtype,
        context_length=int(cfg.max_position_embeddings),
        num_layers=int(cfg.num_hidden_layers),
        num_kv_heads=int(cfg.num_key_value_heads),
        head_dim=int(cfg.head_dim),
        supports_block_reuse=hf_cache.supports_block_reuse(model),
    )


# ---- (a) decode steps ------------------------------------------------------------------------


def _decode_steps(lm: Any, theirs: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Step milliseconds (medians) at each of `options["rows"]`, ours and theirs, interleaved."""
    import torch
    from transformers import DynamicCache

    from bulk.config import KVCacheConfig
    from bulk.engine.model_runner import ModelRunner
    from bulk.engine.request import parse_request
    from bulk.engine.sequence import Sequence, Status
    from bulk.storage.prefix_cache import PrefixCache

    rows_list, context = list(options["rows"]), options["context"]
    most = max(rows_list)
    config = KVCacheConfig(
        model=lm.name,
        dtype=options["dtype"],
        response_cache=False,
        max_batch_tokens=most * (context + 8),
        max_batch_size=most,
    )
    prefix = PrefixCache(config, lm.fingerprint, lm.dtype, lm.block_shape(config.block_size))
    runner = ModelRunner(lm, prefix, config)
    step = runner.plain_step
    if step is not None and not options.get("native_layers", True):
        step.native = None  # decode rows through the plain step's Python loop, for comparison
    out: dict[str, Any] = {
        "batched": runner.batched,
        "plain_step": step is not None,
        "native_layers": step is not None and step.native is not None,
        "native_attention": runner.decode_attention is not None,
        "pool_dtype": str(runner.pool.dtype).removeprefix("torch."),
        "their_attention": theirs.config._attn_implementation,
    }
    rng = random.Random(0)
    vocab = int(lm.model.config.vocab_size)
    prompts = [[rng.randrange(10, vocab) for _ in range(context)] for _ in range(most)]

    # Ours: every row's prompt in one forward, then decode rows over the same context.
    seqs = []
    for i, ids in enumerate(prompts):
        seq = Sequence(parse_request({"query": "x"}, config), 0.0)
        seq.start(ids, 8, lm.tokenizer)
        seq.slot, seq.status = i * (context + 8), Status.PREFILL
        seqs.append(seq)
    runner.forward([(s, context) for s in seqs], [])
    for seq in seqs:
        seq.next_token, seq.status = 5, Status.DECODE

    # Theirs: a DynamicCache of the same prompts per row count (a copy of it before each step).
    caches = {}
    with torch.inference_mode():
        for n in rows_list:
            cache = DynamicCache(config=theirs.config)
            theirs(input_ids=torch.tensor(prompts[:n]), past_key_values=cache, use_cache=True)
            caches[n] = cache
    next_ids = {n: torch.full((n, 1), 5, dtype=torch.long) for n in rows_list}

    def ours(n: int) -> float:
        started = time.perf_counter()
        runner.forward([], seqs[:n])
        elapsed = time.perf_counter() - started
        for seq in seqs[:n]:
            seq.num_computed -= 1  # the same context again
        return elapsed

    def theirs_step(n: int) -> float:
        cache = copy.deepcopy(caches[n])
        with torch.inference_mode():
            started = time.perf_counter()
            theirs(input_ids=next_ids[n], past_key_values=cache, use_cache=True)
            return time.perf_counter() - started

    calls = [(side, n) for n in rows_list for side in ("ours", "theirs")]
    times: dict[tuple[str, int], list[float]] = {call: [] for call in calls}
    for round_ in range(options["steps"] + 1):  # the first round warms up
        for side, n in calls if round_ % 2 == 0 else reversed(calls):
            elapsed = ours(n) if side == "ours" else theirs_step(n)
            if round_ > 0:
                times[(side, n)].append(elapsed * 1000)
    out["ours_ms"] = {str(n): median(times[("ours", n)]) for n in rows_list}
    out["theirs_ms"] = {str(n): median(times[("theirs", n)]) for n in rows_list}
    return out


# ---- (b) prefix reuse ------------------------------------------------------------------------


def _prefix_reuse(lm: Any, options: dict[str, Any]) -> dict[str, Any]:
    """TTFT (medians) of a prompt sharing `shared` tokens with an earlier one, and of a fresh one."""
    from bench.prompts import continuation, unique_prompt
    from bulk.config import KVCacheConfig
    from bulk.engine.engine import UltraAdaptiveKVCacheEngine

    n, shared = options["prompt"], options["shared"]
    config = KVCacheConfig(
        model=lm.name, dtype=options["dtype"], response_cache=False, max_batch_tokens=max(4096, 4 * n)
    )
    tokenizer = lm.tokenizer

    def ask(engine: Any, prompt: str) -> dict[str, Any]:
        body = {"query": prompt, "raw": True, "max_new_tokens": 1, "response_cache": False}
        return engine.process_request_sync(body)

    reuse_ms: list[float] = []
    cold_ms: list[float] = []
    cached: list[int] = []
    cold_cached: list[int] = []
    with UltraAdaptiveKVCacheEngine(config, model=lm) as engine:
        engine.warmup_sync()
        for round_ in range(options["rounds"] + 1):  # the first round warms up
            base = unique_prompt(tokenizer, shared)
            first = base + continuation(tokenizer, base, n)
            second = base + continuation(tokenizer, base, n)
            fresh = unique_prompt(tokenizer, n)
            assert len(tokenizer.encode(second)) == len(tokenizer.encode(fresh)) == n
            ask(engine, first)  # stores its blocks
            sides = ("reuse", "cold") if round_ % 2 == 0 else ("cold", "reuse")
            for side in sides:
                out = ask(engine, second if side == "reuse" else fresh)
                if round_ == 0:
                    continue
                if side == "reuse":
                    reuse_ms.append(out["ttft_ms"])
                    cached.append(out["cached_tokens"])
                else:
                    cold_ms.append(out["ttft_ms"])
                    cold_cached.append(out["cached_tokens"])
    return {
        "reuse_ms": median(reuse_ms),
        "cold_ms": median(cold_ms),
        "cached_tokens": min(cached),
        "cold_cached_tokens": max(cold_cached),
    }


def measure(family: str, options: dict[str, Any]) -> dict[str, Any]:
    """Both parts for one family, in this process."""
    import torch

    from bulk.models.loader import prepare_dense_weights, quantize_for_serving, resolve_dtype

    torch.set_num_threads(options["threads"])
    weights = options.get("weights", "none")
    dtype = resolve_dtype(options["dtype"], torch.device("cpu"))
    if weights != "none":
        dtype = torch.bfloat16  # the quantized layers' activations, as the loader's
    lm = loaded_model(family, options["shape"], dtype)
    if weights != "none":
        # Quantized as the loader quantizes (`weight_quantization`), before transformers' copy:
        # both sides multiply the same int8/int4 weights through the same kernels, and what
        # differs is the path around them (the plain step, its native decode layers, the pool).
        quantize_for_serving(lm.model, weights)
        lm = replace(lm, fingerprint=f"{lm.fingerprint}+w{weights}")
    # transformers' side: a copy taken before the loader's transform (`prepare_dense_weights`) and
    # before our runner routes the model through our attention, as `from_pretrained` hands it over.
    theirs = copy.deepcopy(lm.model)
    if weights == "none":
        prepare_dense_weights(lm.model)
    out: dict[str, Any] = {
        "family": family,
        "dtype": lm.dtype_name,
        "weights": weights,
        "block_reuse": lm.supports_block_reuse,
    }
    out.update(_decode_steps(lm, theirs, options))
    if theirs.config._attn_implementation == "bul_rows":
        raise RuntimeError("transformers' copy was switched to our attention")
    del theirs
    out.update(_prefix_reuse(lm, options))
    return out


def measure_in_child(family: str, options: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.models", "--child", json.dumps({**options, "family": family})]
    answer = subprocess.run(
        command,
        env=child_env({"OMP_NUM_THREADS": str(options["threads"])}),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if answer.returncode != 0:
        raise RuntimeError(f"{family}: the child failed ({answer.returncode}):\n{answer.stderr[-4000:]}")
    return json.loads(answer.stdout.strip().splitlines()[-1])


def run(options: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"options": options, "families": {}}
    for family in options["families"]:
        log.info("family %s (%s shape)", family, options["shape"])
        result["families"][family] = measure_in_child(family, options)
    return result


# ---- the table -------------------------------------------------------------------------------


def _path(entry: dict[str, Any]) -> str:
    if not entry["batched"]:
        return "hf one-by-one"
    if entry["plain_step"]:
        return "plain+native" if entry["native_layers"] else "plain"
    return "hf+ours"


def render(result: dict[str, Any]) -> str:
    options = result["options"]
    first, most = min(options["rows"]), max(options["rows"])
    rows = []
    missed = []
    for family, entry in result["families"].items():
        ours, theirs = entry["ours_ms"], entry["theirs_ms"]
        speedup = ratio(theirs[str(most)], ours[str(most)])
        reuse = ratio(entry["cold_ms"], entry["reuse_ms"])
        mark = "" if speedup is not None and speedup >= TARGET_RATIO else " *"
        if mark or entry["cached_tokens"] <= 0:
            missed.append(family)
        rows.append(
            [
                family,
                _path(entry),
                entry["their_attention"],
                ours[str(first)],
                theirs[str(first)],
                ours[str(most)],
                theirs[str(most)],
                f"{speedup:.2f}x{mark}" if speedup is not None else "-",
                entry["reuse_ms"],
                entry["cold_ms"],
                f"{reuse:.2f}x" if reuse is not None else "-",
                entry["cached_tokens"],
            ]
        )
    any_entry = next(iter(result["families"].values()), {"dtype": "?", "pool_dtype": "?"})
    head = (
        f"model families at the {options['shape']} shape, random weights, {any_entry['dtype']}"
        f"{'' if options.get('weights', 'none') == 'none' else ', weights ' + options['weights']}, "
        f"{options['threads']} threads\n"
        f"decode: step ms over {options['context']} cached tokens a row, median of {options['steps']} "
        f"interleaved rounds; x{most} = theirs/ours at {most} rows (target {TARGET_RATIO}x, * = missed)\n"
        f"ttft: {options['prompt']}-token prompt sharing {options['shared']} tokens with an earlier "
        f"one (reuse) against a fresh one (cold), median of {options['rounds']}; ratio = cold/reuse\n"
        "path: plain = bulk.models.llama_step's plain step (plain+native: its native decode layers), "
        "hf+ours = transformers' forward with our attention\n"
    )
    headers = [
        "family",
        "path",
        "their attn",
        f"ours {first}r ms",
        f"theirs {first}r ms",
        f"ours {most}r ms",
        f"theirs {most}r ms",
        f"x{most}",
        "ttft reuse ms",
        "ttft cold ms",
        "ratio",
        "cached",
    ]
    tail = f"\nmissed a target: {', '.join(missed)}" if missed else "\nevery family met both targets"
    return head + format_table(headers, rows) + tail


# ---- the command line ------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bul bench models", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--families", type=lambda s: s.split(","))
    parser.add_argument("--dtype")
    parser.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--context", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--prompt", type=int)
    parser.add_argument("--shared", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--weights", choices=["none", "int8", "int4"])
    parser.add_argument(
        "--native-layers",
        dest="native_layers",
        type=lambda s: s == "on",
        metavar="on|off",
        help="off: decode rows through the plain step's Python loop instead of the native decode layers",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="results folder (default bench/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        options = json.loads(args.child)
        print(json.dumps(measure(options.pop("family"), options)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = tuple(DEFAULTS)
    options = options_from(QUICK if args.quick else DEFAULTS, args, keys)
    unknown = [f for f in options["families"] if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families {unknown}: one of {', '.join(FAMILIES)}")
    result = run(options)
    print(render(result))
    write_results(NAME, result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
