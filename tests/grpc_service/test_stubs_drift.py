"""The committed stubs are what proto/bul.proto generates: edit the proto, then run
`python -m bulk.grpc_service.regenerate`, or this fails."""

from __future__ import annotations

from bulk.grpc_service.regenerate import GENERATED_DIR, GENERATED_FILES, generate


def test_committed_stubs_match_the_proto(tmp_path):
    written = generate(tmp_path)

    assert sorted(path.name for path in written) == sorted(GENERATED_FILES)
    stale = [path.name for path in written if path.read_text() != (GENERATED_DIR / path.name).read_text()]
    assert not stale, (
        f"stubs out of date with proto/bul.proto: {stale}; run python -m bulk.grpc_service.regenerate"
    )


def test_generated_grpc_module_imports_its_sibling_relatively():
    text = (GENERATED_DIR / "bul_pb2_grpc.py").read_text()
    assert "from . import bul_pb2 as bul__pb2" in text and "\nimport bul_pb2" not in text
