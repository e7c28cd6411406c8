from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.systemd.notify_socket import NotifySocket


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    s = NotifySocket()
    try:
        yield s
    finally:
        s.close()


ROOT = pathlib.Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"


def systemd_analyze() -> str:
    """The tool the unit tests run; missing is a failure (scripts/setup.sh installs it), never a skip."""
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing: run scripts/setup.sh (it installs the Debian package systemd)"
    return path


def with_system_units(root: pathlib.Path) -> pathlib.Path:
    """Give a fake root the host's stock units: `systemd-analyze verify --root` needs sysinit.target & co."""
    stock = root / "usr/lib/systemd/system"
    if not stock.exists():
        shutil.copytree("/usr/lib/systemd/system", stock, symlinks=True)
    return root


@pytest.fixture(scope="session")
def outpost_wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """This checkout as a wheel, built offline (setuptools comes from the dev extra)."""
    src = tmp_path_factory.mktemp("src")  # a copy: the build writes build/ and *.egg-info next to the sources
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("bundle", "engines", "agent", "fleet", "cli", "runtime", "contract"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("outpost-*.whl")
    return wheel
