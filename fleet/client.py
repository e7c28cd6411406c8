"""A small synchronous HTTP client of the fleet API, for the CLI.

urllib keeps the CLI free of an event loop; a file given as the body is sent
in blocks by http.client, so a pushed bundle is never read whole into memory.
Errors come back as `ClientError` with the server's own message.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any

from .config import ClientConfig
from .errors import ClientError, FleetError


class FleetClient:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config

    def request(self, method: str, path: str, body: Any = None, *, query: dict[str, Any] | None = None,
                stream: IO[bytes] | None = None, length: int | None = None) -> Any:
        url = self.config.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        headers = {"Accept": "application/json"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        data: Any = None
        if stream is not None:
            data = stream
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(length)
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise ClientError(e.code, _message(e.read())) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise FleetError(f"cannot reach the fleet at {self.config.url}: {reason}") from None
        return json.loads(raw) if raw else None

    def push(self, archive: str | os.PathLike[str]) -> Any:
        size = os.path.getsize(archive)
        with open(archive, "rb") as f:
            return self.request("POST", "/api/v1/bundles", stream=f, length=size)


def _message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:200].decode(errors="replace")
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return str(data)[:200]
