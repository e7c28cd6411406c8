"""contract/ is shared by both sides only if it drags neither side (nor any I/O stack) in with it."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_importing_the_contract_loads_no_server_client_or_agent_code() -> None:
    code = ("import sys, contract\n"
            "roots = {m.split('.')[0] for m in sys.modules}\n"
            "print(sorted(roots & {'aiohttp', 'sqlalchemy', 'fleet', 'agent', 'engines', 'onnxruntime', "
            "'urllib3', 'requests', 'asyncio'}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
