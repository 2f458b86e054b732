"""Regression for the 500 that schemathesis found: a tiny positive temperature (5.9e-294) underflows to
0 in the float32 sampler (and tiny ones overflow the scaled logits), so the probabilities are NaN and
`torch.multinomial` raises. Such a temperature is greedy in effect and must answer 200.

The fix is in `bulk/generation/sampling.py`: the temperature is clamped to a small floor before dividing."""

from __future__ import annotations

import pytest
import requests


@pytest.mark.parametrize("temperature", [5.866433498641641e-294, 1e-40])
def test_a_tiny_temperature_is_answered(server, temperature):
    rest = requests.post(
        f"{server.url}/api/query",
        json={"query": "tiny temperature", "temperature": temperature, "max_new_tokens": 3},
        timeout=60,
    )
    chat = requests.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": temperature},
        timeout=60,
    )
    assert (rest.status_code, chat.status_code) == (200, 200), (rest.text, chat.text)
