"""The memory tier's budget under random prompt streams, through the real engine and model."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine

STEMS = ["Create marketing strategy ", "Summarise the quarterly report ", "Draft a hiring plan "]

prompts = st.lists(
    st.tuples(st.sampled_from(STEMS), st.text(alphabet="abcdefgh ", min_size=0, max_size=60)),
    min_size=1,
    max_size=8,
)


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=prompts, strategy=st.sampled_from(["lru", "lfu", "adaptive"]))
def test_memory_tier_never_exceeds_max_tokens(demo_model, reference, stream, strategy):
    config = KVCacheConfig(
        model="demo",
        max_tokens=64,
        block_size=8,
        cache_strategy=strategy,
        response_cache=False,
        default_max_new_tokens=3,
    )
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        for stem, tail in stream:
            prompt = stem + tail
            result = engine.process_request_sync({"query": prompt})
            memory = engine.get_stats()["tiers"]["memory"]
            assert memory["tokens"] <= 64 and memory["blocks"] <= 8
            assert memory["pinned_blocks"] == 0  # every request released what it held
            assert result["result"] == reference(prompt, 3).text
