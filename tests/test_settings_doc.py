"""docs/settings.md's table of every `BUL_*` variable is what the settings classes say, and the other
documents name no variable that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

from bulk.cli import settings_doc
from bulk.engine_settings import ENGINE_FIELDS

ROOT = Path(__file__).resolve().parents[1]
# `BUL_*` names that are not environment variables: the Django/Flask settings keys, the pattern of an
# engine option's variable, and the test suite's own.
NOT_VARIABLES = {"BUL_CACHE_CONFIG", "BUL_WARMUP", "BUL_"}


def test_the_generated_table_is_up_to_date():
    text = settings_doc.DOC.read_text()
    assert settings_doc.render(text) == text, (
        "docs/settings.md is out of date: run python -m bulk.cli.settings_doc"
    )
    assert settings_doc.main(["--check"]) == 0


def test_every_engine_option_and_service_option_is_in_the_table():
    listed = settings_doc.variables()
    assert {f"BUL_{name.upper()}" for name in ENGINE_FIELDS} <= listed
    assert {"BUL_PORT", "BUL_API_KEYS", "BUL_BROKER_URL", "BUL_GRPC_PORT", "BUL_RAY_REPLICAS"} <= listed
    text = settings_doc.DOC.read_text()
    assert all(f"| `{name}` |" in text for name in listed)


def test_the_table_detects_drift(tmp_path, monkeypatch):
    doc = tmp_path / "settings.md"
    stale = settings_doc.DOC.read_text().replace("| `BUL_PORT` | `8002` |", "| `BUL_PORT` | `8003` |")
    doc.write_text(stale)
    monkeypatch.setattr(settings_doc, "DOC", doc)
    assert settings_doc.main(["--check"]) == 1
    assert settings_doc.main([]) == 0 and "| `BUL_PORT` | `8002` |" in doc.read_text()


def test_the_documents_name_only_real_variables():
    listed = settings_doc.variables()
    documents = [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "deploy").rglob("*.y*ml")),
    ]
    unknown = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in documents
        for name in re.findall(r"\bBUL_[A-Z0-9_]*[A-Z0-9]\b|\bBUL_(?=<)", path.read_text())
        if name not in listed and name not in NOT_VARIABLES
    }
    assert not unknown, sorted(unknown)
