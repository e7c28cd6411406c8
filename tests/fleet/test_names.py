"""Names that say what they hold: one database URL in the config, a report batcher named so, cited modules exist."""

from __future__ import annotations

import dataclasses
import pathlib
import re

from fleet.config import ServerConfig
from fleet.ingest import ReportBatcher
from fleet.service import Fleet

FLEET_DIR = pathlib.Path(__file__).resolve().parents[2] / "fleet"


def test_the_config_has_one_database_url_normalised_once(tmp_path: pathlib.Path) -> None:
    names = {f.name for f in dataclasses.fields(ServerConfig)} | {n for n in vars(ServerConfig) if "url" in n}
    assert {n for n in names if "url" in n} == {"db_url"}
    assert ServerConfig(data_dir=tmp_path, db_url="postgresql://u@h/db").db_url == "postgresql+asyncpg://u@h/db"
    assert ServerConfig(data_dir=tmp_path, db_url="sqlite:///x.db").db_url == "sqlite+aiosqlite:///x.db"
    assert ServerConfig(data_dir=tmp_path).db_url == f"sqlite+aiosqlite:///{(tmp_path / 'fleet.db').absolute()}"


def test_the_report_batcher_is_named_for_what_it_batches() -> None:
    types = {f.name: f.type for f in dataclasses.fields(Fleet)}
    assert types.get("report_batcher") in (ReportBatcher, "ReportBatcher")
    assert "batcher" not in types


def test_modules_cited_in_fleet_docstrings_exist() -> None:
    root = FLEET_DIR.parent
    cited = []
    for source in FLEET_DIR.rglob("*.py"):
        for ref in re.findall(r"``([\w/]+\.py)``|`([\w/.]+\.py)`", source.read_text()):
            name = ref[0] or ref[1]
            candidates = [root / name, FLEET_DIR / name, source.parent / name]
            cited.append((source.relative_to(root), name, any(c.is_file() for c in candidates)))
    assert cited, "expected docstrings to cite modules"
    assert [(str(s), n) for s, n, ok in cited if not ok] == []
