"""Fuzz the API from its own served OpenAPI document (schemathesis): no input ever gets a 5xx.

The server is a real `outpost fleet serve` process (schemathesis calls are
synchronous), on SQLite and on PostgreSQL, seeded with a bundle and a device
so that some generated requests reach real rows. Examples are bounded to keep
the suite fast; the point is "malformed input never 500s", checked broadly.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from fleet.api.openapi import DOCUMENT

from .pg import empty_tables
from .procs import fleet_server, outpost

MAX_EXAMPLES = 12


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           keypair: tuple[pathlib.Path, pathlib.Path]) -> Iterator[tuple[str, str]]:
    data = tmp_path_factory.mktemp("fuzz-data")
    db = None
    if request.param == "postgresql":
        db = request.getfixturevalue("pg_url")
        asyncio.run(empty_tables(db))
    args = ["--db", db] if db else []
    admin = outpost("fleet", "token", "create", "--data", str(data), "--role", "admin",
                    *args).stdout.splitlines()[-1]
    with fleet_server(data, db, [keypair[1]]) as server:
        yield server.url, admin


@pytest.fixture(scope="module")
def served_schema(served: tuple[str, str]) -> Any:
    url, _ = served
    return schemathesis.openapi.from_url(f"{url}/api/v1/openapi.json")


def _cases() -> list[tuple[str, Any]]:
    """Every operation with valid input; those that take input also with invalid input."""
    out: list[tuple[str, Any]] = []
    for path, item in DOCUMENT["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            label = f"{method.upper()} {path}"
            out.append((label, GenerationMode.POSITIVE))
            if "parameters" in item or "parameters" in op or "requestBody" in op:
                out.append((label, GenerationMode.NEGATIVE))
    return out


@pytest.mark.parametrize(("label", "mode"), _cases(), ids=lambda v: v.value if isinstance(v, GenerationMode) else v)
def test_no_input_gets_a_server_error(label: str, mode: GenerationMode, served: tuple[str, str],
                                      served_schema: Any) -> None:
    url, admin = served
    (operation,) = [op.ok() for op in served_schema.get_all_operations() if op.ok().label == label]
    seen: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
        if response.status_code >= 400 and response.headers.get("Content-Type", "").startswith("application/json"):
            assert isinstance(json.loads(response.text).get("error"), str)

    check()
    assert seen  # the operation really was exercised


def test_served_document_is_the_contract(served: tuple[str, str]) -> None:
    url, _ = served
    with urllib.request.urlopen(f"{url}/api/v1/openapi.json", timeout=10) as r:
        doc = json.loads(r.read())
    assert doc["openapi"].startswith("3.1") and "/api/v1/devices/{device_id}/assignment" in doc["paths"]
    assert doc == json.loads(json.dumps(DOCUMENT))
