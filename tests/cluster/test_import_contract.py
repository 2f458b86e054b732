"""The package cycle that Ray in `bulk.integrations` made (`bulk.server` imports the Celery app from
`bulk.integrations`; the Ray modules imported the server) stays gone: the cluster is `bulk.cluster`,
above the server, and import-linter's contracts (`make lint`) forbid the way back."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# (importer, imported): never, not even through a third package.
FORBIDDEN = [
    ("bulk.integrations", "bulk.server"),
    ("bulk.integrations", "bulk.cluster"),
    ("bulk.server", "bulk.cluster"),
]


def _contracts() -> list[dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["importlinter"]["contracts"]


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN)
def test_a_forbidden_contract_of_make_lint_names_the_import(importer, imported):
    assert any(
        c["type"] == "forbidden" and importer in c["source_modules"] and imported in c["forbidden_modules"]
        for c in _contracts()
    ), f"no import-linter contract forbids {importer} -> {imported}"


def test_every_package_has_a_layer_and_the_cluster_stands_above_the_server():
    layers = next(c for c in _contracts() if c.get("containers") == ["bulk"])
    assert layers.get("exhaustive") is True
    assert any("cluster" in [p.strip() for p in layer.split(":")] for layer in layers["layers"])
    shims = next(c for c in _contracts() if c["name"].startswith("Shims:"))
    names = [[p.strip() for p in layer.replace(":", "|").split("|")] for layer in shims["layers"]]
    cluster = next(i for i, layer in enumerate(names) if "bulk.cluster" in layer)
    server = next(i for i, layer in enumerate(names) if "bulk.server" in layer)
    assert cluster < server  # listed from the top down


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN)
def test_no_chain_of_imports_leads_there_today(importer, imported):
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("bulk", cache_dir=None)
    chain = graph.find_shortest_chain(importer=importer, imported=imported, as_packages=True)
    assert chain is None, " -> ".join(chain)


def test_ray_lives_only_in_the_cluster_package():
    leftovers = sorted(p.name for p in (ROOT / "bulk" / "integrations").glob("ray*"))
    assert leftovers == []
    assert {p.name for p in (ROOT / "bulk" / "cluster").glob("*.py")} >= {
        "__init__.py",
        "app.py",
        "cli.py",
        "router.py",
        "settings.py",
    }
