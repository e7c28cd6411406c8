"""Bundle bytes over HTTP: streamed push, and download with Range, ETag and If-None-Match.

The push body goes straight from the socket into a blob-store upload, capped
while streaming (a declared Content-Length over the cap is refused before a
byte is read). The download's ETag is the archive's sha256, so a device's cache
check is exact, and a single byte range lets an interrupted download resume.
"""

from __future__ import annotations

import asyncio
import re

from aiohttp import web

from ..auth import READ, WRITE, authorize
from ..errors import InvalidRequest, TooLarge
from .common import fleet, principal

routes = web.RouteTableDef()
CHUNK_BYTES = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@routes.post("/api/v1/bundles")
async def push_bundle(request: web.Request) -> web.Response:
    p = await principal(request)
    authorize(p, WRITE)
    f = fleet(request)
    limit = f.config.max_bundle_bytes
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(limit)
    upload = f.blobs.begin_upload()
    try:
        async for chunk in request.content.iter_chunked(CHUNK_BYTES):
            if upload.size + len(chunk) > limit:
                raise TooLarge(limit)
            upload.write(chunk)
        if upload.size == 0:
            raise InvalidRequest("empty body: send a packed bundle (outpost bundle pack)")
        digest = await asyncio.to_thread(upload.finish)
    except BaseException:
        upload.discard()
        raise
    view, created = await f.bundles.push(upload, digest, p.id)
    return web.json_response({**view, "created": created}, status=201 if created else 200)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) for one satisfiable range; None to send everything.

    Raises HTTPRequestRangeNotSatisfiable for a well-formed range past the end.
    Anything else (several ranges, garbage) is ignored, as RFC 9110 allows.
    """
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
        if m.group(2) and end < start:
            return None
    else:
        start, end = max(0, size - int(m.group(2))), size - 1
    if start >= size or size == 0 or end < 0:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, min(end, size - 1)


@routes.get("/api/v1/bundles/{name}/{version}/archive", allow_head=False)
async def download_bundle(request: web.Request) -> web.StreamResponse:
    p = await principal(request)
    if not p.is_device:
        authorize(p, READ)
    b, path = await fleet(request).bundles.for_download(
        request.match_info["name"], request.match_info["version"], p.id if p.is_device else None)
    etag = f'"{b.archive_sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, no-cache"}
    inm = request.headers.get("If-None-Match")
    if inm is not None and (inm.strip() == "*" or etag in {t.strip().removeprefix("W/") for t in inm.split(",")}):
        return web.Response(status=304, headers=headers)
    size = path.stat().st_size
    if_range = request.headers.get("If-Range")
    rng = _byte_range(request.headers.get("Range"), size) if if_range in (None, etag) else None
    start, end = rng if rng is not None else (0, size - 1)
    resp = web.StreamResponse(status=206 if rng is not None else 200, headers=headers)
    resp.content_type = "application/octet-stream"
    resp.content_length = end - start + 1
    if rng is not None:
        resp.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    with open(path, "rb") as fh:
        fh.seek(start)
        remaining = end - start + 1
        while remaining > 0:
            chunk = await loop.run_in_executor(None, fh.read, min(CHUNK_BYTES, remaining))
            if not chunk:
                break
            await resp.write(chunk)
            remaining -= len(chunk)
    await resp.write_eof()
    return resp
