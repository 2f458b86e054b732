"""Benchmarks, run by `bul bench NAME` from the checkout.

A benchmark drives torch from several threads (each engine's model worker, a thread for the Hugging
Face baselines). With OpenMP's default wait policy a thread team that has just finished keeps spinning
on the cores the next thread needs, so whichever side runs after the other pays for it (5-15 % on two
cores). Passive waiting makes the side-by-side comparison fair. It must be set before torch loads.

A process that a benchmark starts (ours, llama.cpp's, the Hugging Face baseline) runs one model thread
and none beside it, so it gets the caller's own policy back (`child_env`): under passive waiting
both our server and llama-cpp-python decoded one stream at about half speed (57-76 ms a token
against 22-33 ms, SmolLM2, 2 threads, 2-core Xeon), which measured the policy, not the servers."""

import os
from collections.abc import Mapping

_CHILD = "BUL_BENCH_CHILD"  # set in a child's environment: its own `import bench` changes nothing
_CALLERS_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")  # None: OpenMP's default
if _CHILD not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a process a benchmark starts (a server, the Hugging Face baseline): this
    one's, with OpenMP's wait policy as the caller had it, then `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if _CALLERS_WAIT_POLICY is not None:
        env["OMP_WAIT_POLICY"] = _CALLERS_WAIT_POLICY
    env[_CHILD] = "1"
    return {**env, **(extra or {})}
