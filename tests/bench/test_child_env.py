"""`bench.child_env`: the benchmarks wait passively for OpenMP threads themselves, but the servers they
start (one model thread each) get the caller's own wait policy back, also when they import `bench`."""

import os
import subprocess
import sys

import bench
from bench.http import ROOT


def test_a_child_gets_the_callers_wait_policy_back(monkeypatch):
    monkeypatch.setattr(bench, "_CALLERS_WAIT_POLICY", None)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # as `import bench` sets it
    env = bench.child_env({"OMP_NUM_THREADS": "2"})
    assert "OMP_WAIT_POLICY" not in env and env["OMP_NUM_THREADS"] == "2"

    monkeypatch.setattr(bench, "_CALLERS_WAIT_POLICY", "ACTIVE")
    assert bench.child_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_child_that_imports_bench_keeps_the_policy_it_was_given(monkeypatch):
    monkeypatch.setattr(bench, "_CALLERS_WAIT_POLICY", None)
    probe = "import os, bench; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=bench.child_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "None"
    # Without the marker, a benchmark process sets passive waiting for itself.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "BUL_BENCH_CHILD")}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "PASSIVE"
