"""Our LRU and LFU against libCacheSim's reference implementations, hit for hit.

Both sides replay the same keys with every object of size 1 and room for `capacity` objects
(libCacheSim's cache size is in bytes; with unit sizes and no metadata accounting that is a count).

LFU is compared exactly too, with no tolerance, because both implement the same rule: libCacheSim's
`LFU` (LFU.c) keeps one list per frequency, appends an object to its new frequency's list on every
hit, counts only while the object is resident (its metadata goes with it on eviction, so a returning
key starts again at 1) and evicts the first object of the lowest frequency's list, i.e. the least
recently promoted among the least frequent: exactly our `LFUPolicy`'s tie-break. Checked on every
benchmark trace as well (`bul bench policies` prints the cross-check)."""

import random
import struct

import libcachesim as lcs
import pytest

from bulk.kv.policies import simulate

INT64_MAX = 2**63 - 1


def zipf_keys(seed: int, n_keys: int, n_accesses: int, skew: float) -> list[int]:
    rng = random.Random(seed)
    ids = list(range(n_keys))
    rng.shuffle(ids)
    weights = [1.0 / (k + 1) ** skew for k in range(n_keys)]
    return [ids[i] for i in rng.choices(range(n_keys), weights=weights, k=n_accesses)]


def libcachesim_hits(cache: lcs.CacheBase, keys: list[int], next_access: list[int] | None = None) -> int:
    req = lcs.Request()
    req.obj_size = 1
    hits = 0
    for i, key in enumerate(keys):
        req.obj_id = key
        if next_access is not None:
            req.next_access_vtime = next_access[i]
        hits += bool(cache.get(req))
    return hits


def next_access(keys: list[int]) -> list[int]:
    out, seen = [0] * len(keys), {}
    for i in range(len(keys) - 1, -1, -1):
        out[i] = seen.get(keys[i], INT64_MAX)
        seen[keys[i]] = i
    return out


TRACES = {
    "zipf-0.8": zipf_keys(seed=11, n_keys=500, n_accesses=4_000, skew=0.8),
    "zipf-1.2": zipf_keys(seed=12, n_keys=2_000, n_accesses=4_000, skew=1.2),
    "uniform": zipf_keys(seed=13, n_keys=300, n_accesses=3_000, skew=0.0),
}
CAPACITIES = (1, 7, 50, 200)


@pytest.mark.parametrize("trace", sorted(TRACES))
@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize(("ours", "reference"), [("lru", lcs.LRU), ("lfu", lcs.LFU)])
def test_matches_libcachesim_exactly(trace, capacity, ours, reference):
    keys = TRACES[trace]
    expected = libcachesim_hits(reference(capacity, hashpower=16), keys)
    assert simulate(ours, keys, capacity) == expected / len(keys)


def test_unit_sizes_make_the_cache_size_a_count():
    # The textbook LRU example: a b c a d b e a b c d e with 3 frames has 10 faults, 2 hits.
    keys = [1, 2, 3, 1, 4, 2, 5, 1, 2, 3, 4, 5]
    cache = lcs.LRU(3, hashpower=8)
    assert libcachesim_hits(cache, keys) == 2
    assert cache.get_n_obj() == 3 and cache.get_occupied_byte() == 3
    assert simulate("lru", keys, 3) == 2 / len(keys)
    # Bélády (MIN) on the same string: 7 faults, 5 hits; "never again" is INT64_MAX.
    assert libcachesim_hits(lcs.Belady(3, hashpower=8), keys, next_access(keys)) == 5


def test_oracle_file_and_requests_agree_on_belady(tmp_path):
    """The benchmark replays libCacheSim in C from an oracleGeneral file, where "no next access" is
    stored as -1; request by request it must be INT64_MAX. Both must give the same optimum."""
    from bench.policies import write_oracle_trace

    keys = TRACES["zipf-0.8"]
    path = tmp_path / "trace.oracleGeneral.bin"
    write_oracle_trace(keys, path)
    assert path.stat().st_size == 24 * len(keys)
    assert struct.unpack_from("<IQIq", path.read_bytes())[1] == keys[0]
    reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
    for capacity in (7, 50):
        miss_ratio, _ = lcs.Belady(capacity, hashpower=16).process_trace(reader)
        hits = libcachesim_hits(lcs.Belady(capacity, hashpower=16), keys, next_access(keys))
        assert round((1.0 - miss_ratio) * len(keys)) == hits
        for ours in ("lru", "lfu", "adaptive"):
            assert simulate(ours, keys, capacity) <= hits / len(keys)
