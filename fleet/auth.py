"""Who is asking, and what they may do.

Three kinds of bearer secret, told apart by prefix so a leaked one is
recognisable in logs and scanners:

- ``otk_...`` operator tokens, each with one role;
- ``dev_...`` device credentials, issued once at enrollment;
- ``enr_...`` enrollment tokens, good only for enrolling, a limited number of
  times, until they expire.

Only the sha256 of a secret is stored: the secrets are 256-bit random, so a
plain hash is as strong as a slow one. Roles nest (admin > operator > viewer):

- viewer: read bundles, devices, assignments, telemetry; download archives;
- operator: also push, assign, label, revoke bundles, create enrollment
  tokens, delete devices;
- admin: also create and revoke operator tokens.

A device credential reaches only its own device: its record, its assignment,
its telemetry, posting its reports (which nobody else may do), and downloading
the bundles assigned to it. No credential, or an unknown or revoked one, is
401; a known principal asking for something outside its rights is 403. The
OpenAPI document and the health endpoint need no credential; enrollment needs
an enrollment token and is rate-limited per client address.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import deque
from dataclasses import dataclass

from sqlalchemy import select, update

from .db import Database, Device, OperatorToken, Revocation
from .errors import Forbidden, InvalidRequest, NotFound, RateLimited, Unauthenticated

ROLES = ("viewer", "operator", "admin")
OPERATOR_PREFIX, DEVICE_PREFIX, ENROLL_PREFIX = "otk_", "dev_", "enr_"


#: Minimum operator role per kind of request.
READ, WRITE, ADMIN = "viewer", "operator", "admin"


@dataclass(frozen=True)
class Principal:
    kind: str                      # "operator" or "device"
    id: str                        # token id or device id
    role: str | None = None        # operators only

    @property
    def is_device(self) -> bool:
        return self.kind == "device"


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def new_id() -> str:
    return secrets.token_hex(8)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidRequest(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    return role


def authorize(principal: Principal, min_role: str, device_id: str | None = None) -> None:
    """Raise Forbidden unless `principal` has `min_role`, or is the device `device_id`.

    Pass `device_id` only where a device may act on itself (read its own record
    and assignment, download what it was assigned); devices never get
    operator rights on anything.
    """
    if principal.is_device:
        if device_id is not None and device_id == principal.id:
            return
        raise Forbidden("a device credential may only act on its own device")
    assert principal.role is not None
    if ROLES.index(principal.role) < ROLES.index(min_role):
        raise Forbidden(f"role {principal.role!r} may not do this (needs {min_role!r})")


def authorize_device_self(principal: Principal, device_id: str) -> None:
    """Device-only endpoints (reports): operators never post as a device."""
    if not principal.is_device:
        raise Forbidden("only a device credential may post device reports")
    if principal.id != device_id:
        raise Forbidden("a device credential may only act on its own device")


def bearer(header: str | None) -> str:
    if not header:
        raise Unauthenticated("missing Authorization: Bearer token")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("expected Authorization: Bearer <token>")
    return token.strip()


class PrincipalCache:
    """Recently verified credentials, so that a busy fleet does not pay a query per request.

    Only successes are cached, for `ttl_s`. Every withdrawal of a credential
    (device deleted, token revoked) is also written to the `revocations` table;
    each fleet process reads that table every second or so (`fleet.watch`) and
    forgets what it lists, so a withdrawn credential stops working everywhere
    within about a second, and `ttl_s` only bounds how long a process that
    missed the news (database unreachable) may keep trusting it.
    """

    def __init__(self, ttl_s: float = 600.0, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, digest: str) -> Principal | None:
        hit = self._entries.get(digest)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, digest: str, principal: Principal) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (time.monotonic() + self.ttl_s, principal)

    def forget_device(self, device_id: str) -> None:
        for digest in [d for d, (_, p) in self._entries.items() if p.is_device and p.id == device_id]:
            del self._entries[digest]

    def forget_token(self, digest: str) -> None:
        self._entries.pop(digest, None)

    def clear(self) -> None:
        self._entries.clear()


async def authenticate(db: Database, token: str, cache: PrincipalCache | None = None) -> Principal:
    digest = hash_secret(token)
    if cache is not None and (hit := cache.get(digest)) is not None:
        return hit
    principal = await _lookup(db, token, digest)
    if cache is not None:
        cache.put(digest, principal)
    return principal


async def _lookup(db: Database, token: str, digest: str) -> Principal:
    async with db.read() as s:
        if token.startswith(OPERATOR_PREFIX):
            row = (await s.execute(select(OperatorToken.id, OperatorToken.role)
                                   .where(OperatorToken.token_hash == digest,
                                          OperatorToken.revoked_at.is_(None)))).first()
            if row is not None:
                return Principal("operator", row.id, row.role)
        elif token.startswith(DEVICE_PREFIX):
            device_id = (await s.execute(select(Device.id).where(Device.credential_hash == digest))).scalar()
            if device_id is not None:
                return Principal("device", device_id)
    raise Unauthenticated("unknown or revoked credential")


async def create_operator_token(db: Database, role: str, name: str = "") -> tuple[str, str]:
    """Returns (token id, secret); the secret is shown once and never stored."""
    check_role(role)
    secret, token_id = new_secret(OPERATOR_PREFIX), new_id()
    async with db.transaction() as s:
        s.add(OperatorToken(id=token_id, name=name[:200], role=role, token_hash=hash_secret(secret),
                            created_at=time.time()))
    return token_id, secret


async def revoke_operator_token(db: Database, token_id: str) -> None:
    now = time.time()
    async with db.transaction() as s:
        row = (await s.execute(update(OperatorToken).where(OperatorToken.id == token_id,
                                                           OperatorToken.revoked_at.is_(None))
                               .values(revoked_at=now).returning(OperatorToken.token_hash))).first()
        if row is None:
            raise NotFound(f"no active operator token {token_id}")
        s.add(Revocation(kind="token", subject=row[0], at=now))


class AttemptLimiter:
    """Sliding-window limit per client address, in process (each fleet process limits its own share)."""

    def __init__(self, per_minute: int, window_s: float = 60.0, max_clients: int = 10_000) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self.max_clients = max_clients
        self._seen: dict[str, deque[float]] = {}

    def hit(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if len(self._seen) >= self.max_clients and client not in self._seen:
            self._seen.clear()
        q = self._seen.setdefault(client, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if len(q) >= self.per_minute:
            raise RateLimited(max(1.0, q[0] + self.window_s - now))
        q.append(now)
