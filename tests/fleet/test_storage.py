"""Storage: migrations match the models on both databases; blobs appear whole or not at all; the key is private."""

from __future__ import annotations

import hashlib
import pathlib
import stat

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from fleet.blobs import LocalBlobStore
from fleet.config import normalise_db_url
from fleet.db import Base, open_database
from fleet.errors import FleetError
from fleet.signing import init_key, load_or_create


async def test_migrated_schema_matches_models_and_migrating_again_is_a_noop(db_url: str) -> None:
    db = await open_database(normalise_db_url(db_url))
    try:
        await db.migrate()  # second run: already at head

        def diff(conn: object) -> list[object]:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))  # type: ignore[arg-type]

        async with db.engine.connect() as conn:
            assert await conn.run_sync(diff) == []
    finally:
        await db.close()


def test_upload_is_invisible_until_committed_and_a_crash_leaves_no_blob(tmp_path: pathlib.Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = b"bundle bytes" * 1000
    digest = hashlib.sha256(data).hexdigest()
    upload = store.begin_upload()
    upload.write(data[:5000])
    # "crash" here: nothing addressable exists
    assert not store.exists(digest)
    assert [p for p in (tmp_path / "blobs" / "sha256").rglob("*") if p.is_file()] == []
    upload.write(data[5000:])
    assert upload.finish() == digest
    assert not store.exists(digest)
    store.commit(upload, digest)
    assert store.exists(digest) and store.path(digest).read_bytes() == data
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    # the crashed upload's leftover is swept
    crashed = store.begin_upload()
    crashed.write(b"partial")
    crashed._file.close()
    assert store.sweep_temporaries(older_than_s=-1) == 1 and not crashed.path.exists()
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")


def test_signing_key_is_created_once_with_mode_0600(tmp_path: pathlib.Path) -> None:
    path, created = init_key(tmp_path / "keys")
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    first = load_or_create(tmp_path / "keys").key_id
    assert init_key(tmp_path / "keys") == (path, False)
    assert load_or_create(tmp_path / "keys").key_id == first
    path.chmod(0o644)
    with pytest.raises(FleetError, match="readable by others"):
        load_or_create(tmp_path / "keys")
