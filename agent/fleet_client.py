"""The agent's async client of the fleet API, over a one-method transport seam.

`FleetClient` speaks the fleet's JSON API (enroll, key, long-poll, reports)
and hands downloads to `agent.download`. Every byte goes through a
`Transport`: one awaitable that turns an `HttpRequest` into an `HttpResponse`.
The default, `AiohttpTransport`, is a real HTTP client (TLS verified, optional
CA file, redirects never followed so the credential never leaves the fleet's
origin); tests may hand in an in-memory fleet instead of patching anything.

Load shedding: a fleet that answers 503 (or 429) with ``Retry-After`` is
asking this device to come back later, as it does with a cold-start herd
after a power cut. The client waits as asked (capped at
`max_retry_after_s`, stretched by up to a quarter at random so a herd stays
spread, never shortened) and sends the same request again, up to
`busy_retries` times; then the 503 is raised as `FleetBusy` (retryable:
callers keep what they hold, e.g. the reporter keeps its reports queued).

Errors: foreign exceptions are translated inside the transport (to
`FleetUnreachable`), HTTP error statuses here (to `FleetRejected` /
`AuthFailed`); see `agent.fleet_errors` for the tree.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import pathlib
import random
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from runtime.timeouts import timeout

from .fleet_errors import AuthFailed, FleetRejected, FleetUnreachable

if TYPE_CHECKING:
    import aiohttp

    from .credentials import Credential
    from .download import BlobStore, DownloadPolicy

log = logging.getLogger(__name__)

#: Largest JSON answer read from the fleet (an assignment of 64 bundles is about 80 kB).
MAX_JSON_BYTES = 4 << 20


@dataclass(frozen=True)
class HttpRequest:
    """`path` is fleet-relative and includes the query string; `timeout_s` bounds the wait for the headers."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | AsyncIterator[bytes] | None = None
    timeout_s: float = 30.0


async def _no_close() -> None:
    return None


@dataclass
class HttpResponse:
    """Headers are lower-cased; the body is read once, by `body` or `aread`; `aclose` drops what is left."""

    status: int
    headers: Mapping[str, str]
    body: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]] = _no_close

    async def aread(self, max_bytes: int = MAX_JSON_BYTES) -> bytes:
        chunks: list[bytes] = []
        total = 0
        try:
            async for chunk in self.body:
                total += len(chunk)
                if total > max_bytes:
                    raise FleetRejected(self.status, f"answer larger than {max_bytes} bytes")
                chunks.append(chunk)
        finally:
            await self.aclose()
        return b"".join(chunks)

    async def aclose(self) -> None:
        await self.close()

    async def __aenter__(self) -> HttpResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Transport(Protocol):
    async def __call__(self, request: HttpRequest) -> HttpResponse: ...


class AiohttpTransport:
    """The real transport: one aiohttp session per client, created on first use in the running loop."""

    def __init__(self, base_url: str, *, ca_file: str | pathlib.Path | None = None,
                 connect_timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.ca_file = ca_file
        self.connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None or self._session.closed:
            ssl_ctx: ssl.SSLContext | bool = True
            if self.ca_file is not None:
                ssl_ctx = ssl.create_default_context(cafile=str(self.ca_file))
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
                connector=aiohttp.TCPConnector(ssl=ssl_ctx), auto_decompress=False)
        return self._session

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        import aiohttp

        session = self._open()
        url = self.base_url + request.path
        # Bytes as stored, never a content-coding: Range offsets and hashes refer to them.
        headers = {"Accept-Encoding": "identity", **request.headers}
        try:
            async with timeout(request.timeout_s):
                resp = await session.request(request.method, url, headers=headers, data=request.body,
                                             allow_redirects=False)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise FleetUnreachable(f"cannot reach the fleet at {self.base_url}: {_describe(e)}") from e

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                raise FleetUnreachable(f"connection to {self.base_url} lost: {_describe(e)}") from e

        async def close() -> None:
            # Close rather than release: a half-read body must not go back to the pool.
            resp.close()

        return HttpResponse(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body(), close)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class FleetBusy(FleetRejected):
    """The fleet shed this request (503/429) and kept doing so after every wait it asked for."""

    def __init__(self, status: int, message: str, retry_after_s: float) -> None:
        super().__init__(status, message)
        self.retry_after_s = retry_after_s


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a ``Retry-After`` header asks for (delay-seconds or an HTTP-date); None if absent or garbled."""
    raw = headers.get("retry-after", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        value = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, value) if math.isfinite(value) else None


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


class FleetClient:
    """One device's view of the fleet API. `credential` is the device's bearer secret."""

    def __init__(self, base_url: str, device_id: str, credential: str, transport: Transport | None = None, *,
                 ca_file: str | pathlib.Path | None = None, timeout_s: float = 30.0,
                 busy_retries: int = 5, max_retry_after_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.busy_retries = busy_retries
        self.max_retry_after_s = max_retry_after_s
        #: requests the fleet shed that were sent again after its Retry-After (for tests and status)
        self.busy_waits = 0
        self.device_id = device_id
        self._credential = credential
        self._owned = transport is None
        self.transport: Transport = transport or AiohttpTransport(self.base_url, ca_file=ca_file)
        self.timeout_s = timeout_s

    @classmethod
    def from_credential(cls, credential: Credential, transport: Transport | None = None, *,
                        ca_file: str | pathlib.Path | None = None) -> FleetClient:
        return cls(credential.fleet_url, credential.device_id, credential.secret, transport, ca_file=ca_file)

    def __repr__(self) -> str:
        return f"FleetClient({self.base_url!r}, device_id={self.device_id!r})"

    async def aclose(self) -> None:
        closer = getattr(self.transport, "aclose", None)
        if self._owned and closer is not None:
            await closer()

    async def __aenter__(self) -> FleetClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- the API ---

    async def enroll(self, token: str, labels: Mapping[str, str] | None = None, name: str = "") -> Credential:
        """Trade an enrollment token for this device's id and credential (the client keeps using them)."""
        from .credentials import Credential

        body = await self._json("POST", "/api/v1/enroll", {"name": name, "labels": dict(labels or {})},
                                bearer=token)
        cred = Credential(fleet_url=self.base_url, device_id=str(body["device_id"]),
                          secret=str(body["credential"]), labels=dict(body.get("labels") or {}))
        self.device_id, self._credential = cred.device_id, cred.secret
        return cred

    async def fleet_key(self) -> bytes:
        """The fleet's assignment-signing public key (PEM); trust it only as the config says."""
        body = await self._json("GET", "/api/v1/keys/assignment")
        pem = body.get("public_key_pem")
        if not isinstance(pem, str):
            raise FleetRejected(200, "key answer without public_key_pem")
        return pem.encode()

    async def poll_assignment(self, known_serial: int | None, wait_s: float) -> dict[str, Any]:
        """The signed envelope; with a known serial, the fleet holds the answer up to `wait_s` for a change."""
        query = "" if known_serial is None else f"?serial={known_serial}&wait_s={wait_s:g}"
        body = await self._json("GET", f"{self._device_path()}/assignment{query}",
                                timeout_s=(wait_s if known_serial is not None else 0) + self.timeout_s)
        return body

    async def download(self, url: str, store: BlobStore | pathlib.Path, expected_sha256: str, size: int,
                       policy: DownloadPolicy | None = None) -> pathlib.Path:
        """The verified archive at ``store/blobs/sha256/<hex>`` (fetched only if not there already)."""
        from .download import DownloadPolicy, fetch_blob

        return await fetch_blob(self, url, store, expected_sha256, size, policy or DownloadPolicy())

    async def send_report(self, report: Mapping[str, Any]) -> None:
        await self._json("POST", f"{self._device_path()}/reports", report)

    async def send_reports(self, reports: list[dict[str, Any]]) -> None:
        """In order; the first failure propagates (those before it were delivered)."""
        for report in reports:
            await self.send_report(report)

    async def get(self, path: str, headers: Mapping[str, str] | None = None,
                  timeout_s: float | None = None) -> HttpResponse:
        """An authenticated GET whose body the caller streams (downloads); error statuses are raised."""
        resp = await self._send(HttpRequest("GET", path, {**self._auth(None), **(headers or {})},
                                            timeout_s=timeout_s or self.timeout_s))
        if resp.status >= 400:
            raise _rejection(resp.status, await resp.aread())
        return resp

    # --- plumbing ---

    async def _send(self, request: HttpRequest) -> HttpResponse:
        """One request, sent again after each Retry-After the fleet answers with (see the module notes)."""
        attempt = 0
        while True:
            resp = await self.transport(request)
            delay = retry_after_s(resp.headers) if resp.status in (429, 503) else None
            if delay is None:
                return resp
            raw = await resp.aread()
            if attempt >= self.busy_retries or not isinstance(request.body, (bytes, type(None))):
                raise FleetBusy(resp.status, _rejection(resp.status, raw).reason, delay)
            wait = min(delay, self.max_retry_after_s) * random.uniform(1.0, 1.25)
            log.info("fleet busy (HTTP %d on %s %s): retrying in %.1f s as it asked", resp.status,
                     request.method, request.path.split("?")[0], wait)
            await asyncio.sleep(wait)
            attempt += 1
            self.busy_waits += 1

    def _device_path(self) -> str:
        return "/api/v1/devices/" + urllib.parse.quote(self.device_id, safe="")

    def _auth(self, bearer: str | None) -> dict[str, str]:
        secret = bearer if bearer is not None else self._credential
        return {"Authorization": f"Bearer {secret}"} if secret else {}

    async def _json(self, method: str, path: str, body: Any = None, *, bearer: str | None = None,
                    timeout_s: float | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json", **self._auth(bearer)}
        data = None
        if body is not None:
            data = json.dumps(body, allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        limit = timeout_s or self.timeout_s
        resp = await self._send(HttpRequest(method, path, headers, data, timeout_s=limit))
        try:
            async with timeout(limit):
                raw = await resp.aread()
        except asyncio.TimeoutError as e:
            raise FleetUnreachable(f"fleet at {self.base_url} did not finish answering {method} {path}") from e
        if resp.status >= 400:
            raise _rejection(resp.status, raw)
        try:
            out = json.loads(raw) if raw else {}
        except ValueError:
            raise FleetRejected(resp.status, f"answer to {method} {path} is not JSON") from None
        if not isinstance(out, dict):
            raise FleetRejected(resp.status, f"answer to {method} {path} is not a JSON object")
        return out


def _rejection(status: int, raw: bytes) -> FleetRejected:
    message = raw[:200].decode(errors="replace")
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            message = data["error"][:500]
    except ValueError:
        pass
    return (AuthFailed if status in (401, 403) else FleetRejected)(status, message)
