"""Build only from verified bytes (THREATS #12): a private, hash-checked copy of the model's files.

Verification hashes a bundle's files where they lie; a build that read them
there again later could read something else (a file swapped in between, by
anyone who can write the bundle directory). So the build child copies every
file the model is made of into a directory of its own, hashing the bytes it
copies, and refuses when a digest differs from the one verification vouched
for. Everything after that (the backend's build, the first inference, the
parity reference) reads only the copy, and the digests it computed are what
the cache entry records as `built_from`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from .backend import BuildContext
from .errors import ModelChanged

_CHUNK = 1 << 20


def copy_checked(src: pathlib.Path, dest: pathlib.Path, sha256: str) -> None:
    """Copy `src` to `dest`, hashing the very bytes written; `ModelChanged` if they are not `sha256`."""
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(src, "rb") as fin, open(dest, "xb") as fout:
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                fout.write(chunk)
    except OSError as e:
        raise ModelChanged(f"cannot read {src} for the build: {e}") from e
    if digest.hexdigest() != sha256:
        raise ModelChanged(f"{src} changed after the bundle was verified (sha256 {digest.hexdigest()[:16]}..., "
                           f"verified {sha256[:16]}...); refusing to build it. Verify the bundle again.")
    os.chmod(dest, 0o400)


@contextlib.contextmanager
def private_copy(ctx: BuildContext, under: pathlib.Path) -> Iterator[BuildContext]:
    """The context rewritten to read a checked private copy of its sources (removed on exit).

    A context without `sources` (an engine made outside a verified bundle) is
    returned unchanged.
    """
    if not ctx.sources:
        yield ctx
        return
    private = pathlib.Path(tempfile.mkdtemp(prefix=f"{under.name}.src.", dir=under.parent))
    try:
        root = pathlib.Path(ctx.source_root)
        for rel, sha256 in ctx.sources:
            copy_checked(root / rel, private / rel, sha256)
        yield dataclasses.replace(ctx, model_path=str(private / ctx.model_file), source_root=str(private))
    finally:
        for dirpath, _, names in os.walk(private):
            for n in names:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(dirpath, n), 0o600)
        shutil.rmtree(private, ignore_errors=True)


def built_from(ctx: BuildContext) -> dict[str, str]:
    """What a cache entry records: the sha256 of every source file it was built from."""
    return dict(ctx.sources)
