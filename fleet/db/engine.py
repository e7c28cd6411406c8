"""Engine set-up and programmatic migrations for either database.

The URL alone picks the database. The only per-database choices live here and
are about the engine, not SQL: SQLite gets WAL, foreign keys, a busy timeout,
one writer connection that takes the write lock when its transaction begins
(SQLite has one writer anyway; this turns "database is locked" races into an
orderly queue) and a few reader connections that run beside it. PostgreSQL
gets one real pool for both, and an advisory lock around migrations so that
fleet processes started side by side do not race to create the schema.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

MIGRATIONS_DIR = pathlib.Path(__file__).resolve().parent.parent / "migrations"
#: Arbitrary constant naming the fleet's migration lock in PostgreSQL.
_MIGRATION_LOCK_ID = 0x0F1EE7
_SQLITE_WRITERS, _SQLITE_READERS = 1, 4


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event, not the driver, open transactions (see below).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_engine(url: str, *, writer: bool) -> AsyncEngine:
    """The writer opens BEGIN IMMEDIATE, so it waits for the file lock up front
    (busy_timeout) instead of failing when a read would have to upgrade to a
    write; readers open plain deferred transactions, concurrent under WAL."""
    engine = create_async_engine(url, pool_size=_SQLITE_WRITERS if writer else _SQLITE_READERS, max_overflow=0,
                                 pool_timeout=120)
    begin = "BEGIN IMMEDIATE" if writer else "BEGIN"
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    event.listen(engine.sync_engine, "begin", lambda conn: conn.exec_driver_sql(begin))
    return engine


def _alembic_config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection) -> None:
    command.upgrade(_alembic_config(connection), "head")


@dataclass
class Database:
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    #: Sessions for read-only work; the same as `sessions` except on SQLite.
    read_sessions: async_sessionmaker[AsyncSession]
    #: Connections the pools hold at most: units of work beyond it wait for one.
    capacity: int = 1
    #: Units of work (`transaction` or `read`) open now, running or waiting for a connection.
    in_flight: int = 0

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work that may write: committed on clean exit, rolled back on any error."""
        self.in_flight += 1
        try:
            async with self.sessions() as session, session.begin():
                yield session
        finally:
            self.in_flight -= 1

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only unit of work; never writes, so on SQLite it does not queue behind writers."""
        self.in_flight += 1
        try:
            async with self.read_sessions() as session, session.begin():
                yield session
        finally:
            self.in_flight -= 1

    async def migrate(self) -> None:
        async with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            await conn.run_sync(_upgrade)

    async def close(self) -> None:
        await self.engine.dispose()
        reader = self.read_sessions.kw.get("bind")
        if reader is not None and reader is not self.engine:
            await reader.dispose()


async def open_database(url: str, *, migrate: bool = True, pool_size: int = 10) -> Database:
    if url.startswith("sqlite"):
        engine = _sqlite_engine(url, writer=True)
        reader = _sqlite_engine(url, writer=False)
        capacity = _SQLITE_WRITERS + _SQLITE_READERS
    else:
        # No pool_pre_ping: it cost a round trip and ~9% of the fleet's CPU per unit of work at
        # 2,000 devices (py-spy, bench/README.md). A connection that died under us (PostgreSQL
        # restarted) fails its statement once, and SQLAlchemy then invalidates the whole pool.
        engine = reader = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_timeout=60,
                                              pool_recycle=3600)
        capacity = 2 * pool_size
    db = Database(engine, async_sessionmaker(engine, expire_on_commit=False),
                  async_sessionmaker(reader, expire_on_commit=False), capacity=capacity)
    if migrate:
        try:
            await db.migrate()
        except BaseException:
            await db.close()
            raise
    return db
