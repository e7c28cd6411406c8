"""Dashboard sessions and CSRF tokens, signed with a key every fleet process sharing DATA/keys reads.

The session cookie holds the operator token's id, an expiry and a nonce, with
an HMAC-SHA256 over them; it never holds the token itself. Each request
re-checks that the token is not revoked, so revoking a token ends its
sessions at once. The CSRF token of a session is an HMAC of its nonce: a
form must echo it, a cross-site page cannot read it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import pathlib
import secrets
import time
from dataclasses import dataclass

COOKIE = "outpost_session"
LOGIN_CSRF_COOKIE = "outpost_login_csrf"
KEY_NAME = "dashboard-session.key"


def load_or_create_key(key_dir: pathlib.Path) -> bytes:
    """32 random bytes in DATA/keys, created once (O_EXCL: two processes starting together agree)."""
    key_dir.mkdir(parents=True, exist_ok=True)
    path = key_dir / KEY_NAME
    with contextlib.suppress(FileExistsError):
        tmp = key_dir / f".{KEY_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process won: keep theirs
        finally:
            os.unlink(tmp)
    data = path.read_bytes()
    if len(data) != 32:
        raise ValueError(f"{path}: expected 32 bytes of key, found {len(data)}")
    return data


@dataclass(frozen=True)
class Session:
    token_id: str
    expires_at: float
    nonce: str


class SessionSigner:
    def __init__(self, key: bytes, ttl_s: float = 12 * 3600) -> None:
        self.key = key
        self.ttl_s = ttl_s

    def _mac(self, data: bytes) -> str:
        return hmac.new(self.key, data, hashlib.sha256).hexdigest()

    def issue(self, token_id: str) -> tuple[str, Session]:
        s = Session(token_id, time.time() + self.ttl_s, secrets.token_urlsafe(16))
        body = base64.urlsafe_b64encode(json.dumps([s.token_id, s.expires_at, s.nonce]).encode()).decode()
        return f"{body}.{self._mac(body.encode())}", s

    def read(self, cookie: str | None) -> Session | None:
        if not cookie or "." not in cookie or len(cookie) > 1000:
            return None
        body, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac, self._mac(body.encode())):
            return None
        try:
            token_id, expires_at, nonce = json.loads(base64.urlsafe_b64decode(body.encode()))
        except (ValueError, TypeError):
            return None
        if not isinstance(expires_at, (int, float)) or expires_at < time.time():
            return None
        return Session(str(token_id), float(expires_at), str(nonce))

    def csrf(self, session: Session) -> str:
        return self._mac(f"csrf:{session.nonce}".encode())

    def check_csrf(self, session: Session, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(self.csrf(session), str(given))
