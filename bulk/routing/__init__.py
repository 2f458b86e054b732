"""Prefix-aware request routing across engine replicas, free of any cluster framework.

- `chains`: a request's block-hash chain, computed as the engine computes it (same parsing, chat
  rendering, tokenizer and `bulk.kv.hashing`), and the compact form replicas report theirs in.
- `policy`: which replica a request goes to: the one holding its longest cached prefix, unless that
  replica's queue exceeds the least loaded one's by a threshold (then power-of-two choices); sessions
  stay with their replica while it is up.

`bulk.cluster.router` wires the policy into Ray Serve's request router; `bench/routing.py`
drives the same policy in a trace-driven simulation of up to 128 replicas."""
