"""A PostgreSQL server for the tests: found through OUTPOST_TEST_POSTGRES_URL, or started privately.

The private cluster lives in a temporary directory, listens on a free
loopback port (and a socket in that directory), and is stopped and deleted at
the end. PostgreSQL refuses to run as root, so as root it runs as the
`postgres` user that the Debian package creates. Each test session gets its own
freshly created database with a random name, dropped at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import glob
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

ENV_URL = "OUTPOST_TEST_POSTGRES_URL"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {name} not found: install postgresql (scripts/setup.sh does) "
                           f"or set {ENV_URL}")
    return path


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    return [runuser, "-u", "postgres", "--", *cmd] if runuser else ["su", "postgres", "-c", " ".join(cmd)]


@contextlib.contextmanager
def _private_cluster() -> Iterator[str]:
    base = pathlib.Path(tempfile.mkdtemp(prefix="outpost-pg-"))
    data = base / "data"
    port = _free_port()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    os.chmod(base, 0o700)
    try:
        subprocess.run(_as_postgres([_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                     "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run(_as_postgres([_bin("pg_ctl"), "-D", str(data), "-o", options, "-w", "-t", "60",
                                     "-l", str(base / "log"), "start"]), check=True, capture_output=True)
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(_as_postgres([_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _admin(server_url: str, sql: str) -> None:
    """Run one statement on the server, in a thread: callers may be inside an event loop."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """Yield the URL of a new, empty database (postgresql://...), dropped afterwards."""
    with contextlib.ExitStack() as stack:
        server = os.environ.get(ENV_URL) or stack.enter_context(_private_cluster())
        name = "outpost_test_" + secrets.token_hex(6)
        _admin(server, f'CREATE DATABASE "{name}"')
        try:
            base, _, _ = server.rpartition("/")
            yield f"{base}/{name}"
        finally:
            _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def empty_tables(url: str) -> None:
    """Delete every row of the fleet schema (migrating first if needed): a clean slate per test."""
    from sqlalchemy import delete

    from fleet.config import normalise_db_url
    from fleet.db import Base, open_database
    db = await open_database(normalise_db_url(url))
    try:
        async with db.transaction() as s:
            for table in reversed(Base.metadata.sorted_tables):
                await s.execute(delete(table))
    finally:
        await db.close()
