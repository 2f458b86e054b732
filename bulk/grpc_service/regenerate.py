"""Regenerate the committed gRPC stubs from `proto/bul.proto`: `python -m bulk.grpc_service.regenerate`.

The stubs are committed (rather than built at install time) so that installing `bulk[grpc]` needs no
protoc and the package imports the same code everywhere; `tests/grpc_service/test_stubs_drift.py`
regenerates them into a temporary folder and fails while they differ from the committed ones."""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
PROTO_FILE = "bul.proto"
GENERATED_DIR = Path(__file__).resolve().parent / "generated"
GENERATED_FILES = ("bul_pb2.py", "bul_pb2.pyi", "bul_pb2_grpc.py")
HEADER = "# Generated from proto/bul.proto by `python -m bulk.grpc_service.regenerate`. Do not edit.\n"

# protoc writes `import bul_pb2 as bul__pb2`, which works only with the output folder on sys.path;
# inside a package the sibling module must be imported relatively.
_ABSOLUTE_IMPORT = re.compile(r"^import (bul_pb2) as (\w+)$", re.MULTILINE)


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run grpcio-tools' protoc on `proto_dir/bul.proto` into `out_dir`; return the files written."""
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/struct.proto
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto_dir / PROTO_FILE),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {proto_dir / PROTO_FILE}")
    written = []
    for name in GENERATED_FILES:
        path = out_dir / name
        text = _ABSOLUTE_IMPORT.sub(r"from . import \1 as \2", path.read_text())
        path.write_text(HEADER + text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=GENERATED_DIR, help="output folder (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in generate(args.out):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
