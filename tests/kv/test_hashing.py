import os
import subprocess
import sys
from pathlib import Path

import pytest

from bulk.kv.hashing import chain_hashes, namespace_digest

REPO = Path(__file__).resolve().parents[2]
NS = namespace_digest("demo", 4, "float16", "none")
TOKENS = [5, 17, 0, 2**32 - 1, 9, 9, 9, 9, 1, 2]  # two full blocks of 4, then a partial one


def test_same_input_same_hashes():
    first = chain_hashes(TOKENS, 4, NS)
    assert first == chain_hashes(list(TOKENS), 4, NS)
    assert all(isinstance(h, bytes) and len(h) == 32 for h in first)
    assert len(set(first)) == len(first)


def test_namespace_fields_all_matter():
    base = ("demo", 4, "float16", "none")
    digests = {namespace_digest(*base)}
    for variant in (
        ("demo2", 4, "float16", "none"),
        ("demo", 8, "float16", "none"),
        ("demo", 4, "bfloat16", "none"),
        ("demo", 4, "float16", "int8"),
        # Length prefixes: shifting bytes between fields must not alias.
        ("demofloat16", 4, "", "none"),
    ):
        digests.add(namespace_digest(*variant))
    assert len(digests) == 6
    assert namespace_digest(*base) == NS


def test_different_namespace_parent_or_token_changes_hashes():
    base = chain_hashes(TOKENS, 4, NS)
    other_ns = namespace_digest("other", 4, "float16", "none")
    assert chain_hashes(TOKENS, 4, other_ns)[0] != base[0]
    assert chain_hashes(TOKENS, 4, NS, parent=b"\x01" * 32)[0] != base[0]
    changed = [*TOKENS]
    changed[5] += 1  # second block only
    hashes = chain_hashes(changed, 4, NS)
    assert hashes[0] == base[0]
    assert hashes[1] != base[1]
    changed_first = [TOKENS[0] + 1, *TOKENS[1:]]
    # A change in block 0 changes every later block through the chain.
    assert all(a != b for a, b in zip(chain_hashes(changed_first, 4, NS), base, strict=True))


def test_partial_blocks_get_no_hash():
    assert chain_hashes(TOKENS, 4, NS) == chain_hashes(TOKENS[:8], 4, NS)
    assert len(chain_hashes(TOKENS, 4, NS)) == 2
    assert chain_hashes(TOKENS[:3], 4, NS) == []
    assert chain_hashes([], 4, NS) == []


def test_continuing_a_chain_equals_hashing_the_whole():
    tokens = list(range(40))
    whole = chain_hashes(tokens, 4, NS)
    head = chain_hashes(tokens[:12], 4, NS)
    tail = chain_hashes(tokens[12:], 4, NS, parent=head[-1])
    assert head + tail == whole


@pytest.mark.parametrize("bad", [-1, 2**32, 1.0, "3", None])
def test_bad_token_ids_raise(bad):
    with pytest.raises(ValueError):
        chain_hashes([1, 2, bad, 4], 4, NS)
    with pytest.raises(ValueError):  # a trailing partial block is validated too
        chain_hashes([1, 2, 3, 4, bad], 4, NS)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        chain_hashes(TOKENS, 0, NS)
    with pytest.raises(ValueError):
        namespace_digest("demo", 0, "float16", "none")


def test_hashes_are_stable_across_processes():
    script = (
        "from bulk.kv.hashing import chain_hashes, namespace_digest\n"
        f"ns = namespace_digest('demo', 4, 'float16', 'none')\n"
        f"print(' '.join(h.hex() for h in chain_hashes({TOKENS!r}, 4, ns)))\n"
    )
    outputs = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, check=True
        )
        outputs.append(result.stdout.split())
    expected = [h.hex() for h in chain_hashes(TOKENS, 4, NS)]
    assert outputs[0] == outputs[1] == expected
