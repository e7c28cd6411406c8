"""What the agent knows across restarts, on disk, each change one atomic file replace.

    state_dir/agent.json            the trusted assignment state (serial, issued/expiry), last sync and error,
                                    counters (downloads), recent events
    state_dir/bundles/<name>.json   one record per bundle name: active / last-known-good install, the update
                                    in progress and its step, the anti-rollback floor, failed starts,
                                    digests refused for good

Every write is temp file + fsync + rename + fsync of the directory
(`bundle.atomic_write_bytes`), so a kill -9 or power cut at any instant
leaves either the old record or the new one, never a mix. Switching is one
such write: the record names exactly one active install, so after any crash
exactly one complete version is active per bundle.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bundle import atomic_write_bytes

from ..errors import AgentError

#: the lifecycle of one update, in order; each is recorded before the work that follows it
STEPS = ("assigned", "prechecked", "downloaded", "installed", "built", "gated", "switched", "committed")
MAX_EVENTS = 50
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StateError(AgentError):
    status = 500


@dataclass(frozen=True)
class Installed:
    """One verified, read-only install of a bundle version."""

    version: str
    release: int
    digest: str
    archive_sha256: str
    path: str

    @property
    def ref_suffix(self) -> str:
        return f"{self.version} ({self.digest[:12]})"


@dataclass(frozen=True)
class Pending:
    """The update in progress: which version, and the last step it completed."""

    version: str
    digest: str
    archive_sha256: str
    step: str
    since: float


@dataclass
class BundleRecord:
    name: str
    active: Installed | None = None
    last_known_good: Installed | None = None
    pending: Pending | None = None
    #: anti-rollback floor: the highest release ever committed here; lower releases are refused
    floor: int = 0
    #: bundle digest -> why it was refused (verification, gate, crash loop); not retried while the
    #: assignment serial it was refused under stands (see `refused_serial`)
    refused: dict[str, str] = field(default_factory=dict)
    #: bundle digest -> the serial it was refused under: a new assignment (a new serial) may retry it, since
    #: a refusal can come from the moment (a gate's latency on a busy device); absent = refused for good
    #: (a crash loop)
    refused_serial: dict[str, int] = field(default_factory=dict)
    #: the last failure of an update: {"ref", "step", "reason", "at"}
    last_failure: dict[str, Any] | None = None
    #: install directory name -> sha256 of the archive it came from (GC keeps the archives of kept installs)
    archives: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def is_refused(self, digest: str, serial: int | None) -> bool:
        if digest not in self.refused:
            return False
        under = self.refused_serial.get(digest)
        return under is None or under == serial

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BundleRecord:
        def inst(d: Any) -> Installed | None:
            return Installed(**d) if d else None

        pending = doc.get("pending")
        return cls(name=doc["name"], active=inst(doc.get("active")), last_known_good=inst(doc.get("last_known_good")),
                   pending=Pending(**pending) if pending else None, floor=int(doc.get("floor", 0)),
                   refused=dict(doc.get("refused") or {}),
                   refused_serial={k: int(v) for k, v in (doc.get("refused_serial") or {}).items()},
                   last_failure=doc.get("last_failure"), archives=dict(doc.get("archives") or {}))


@dataclass
class AgentState:
    device_id: str = ""
    serial: int = 0
    issued_at: float = 0.0
    expires_at: float = 0.0
    last_sync: float | None = None
    last_error: str | None = None
    downloads: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    #: served model name -> {"version", "backend", "fallbacks"}: what `outpost agent status` shows
    serving: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: pid of the running agent and when it started (None when it stopped cleanly)
    pid: int | None = None
    started_at: float | None = None

    def add_event(self, event: dict[str, Any]) -> None:
        self.events = [*self.events, event][-MAX_EVENTS:]


class StateStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = pathlib.Path(root)
        self.bundles_dir = self.root / "bundles"
        self.bundles_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- agent-wide ------------------------------------------------------------------------
    def load_agent(self) -> AgentState:
        doc = self._read(self.root / "agent.json")
        if doc is None:
            return AgentState()
        known = {k: v for k, v in doc.items() if k in AgentState.__dataclass_fields__}
        return AgentState(**known)

    def save_agent(self, state: AgentState) -> None:
        self._write(self.root / "agent.json", asdict(state))

    # -- per bundle --------------------------------------------------------------------------
    def _bundle_path(self, name: str) -> pathlib.Path:
        if not _NAME.match(name):
            raise StateError(f"bundle name {name[:80]!r} is not a safe file name")
        return self.bundles_dir / f"{name}.json"

    def load(self, name: str) -> BundleRecord:
        doc = self._read(self._bundle_path(name))
        return BundleRecord.from_json(doc) if doc is not None else BundleRecord(name)

    def save(self, record: BundleRecord) -> None:
        self._write(self._bundle_path(record.name), record.to_json())

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.bundles_dir.glob("*.json"))

    # -- the crash-loop start counter -----------------------------------------------------
    # Its own file, written only at start (count before loading) and when a start became stable, so an
    # update saving the bundle record meanwhile never writes back a stale count. It counts for one digest:
    # a switch to another version starts it from zero without touching it.
    def failed_starts(self, name: str, digest: str) -> int:
        doc = self._read(self._bundle_path(name).with_suffix(".starts"))
        return int(doc.get("count", 0)) if doc is not None and doc.get("digest") == digest else 0

    def set_failed_starts(self, name: str, digest: str, count: int) -> None:
        self._write(self._bundle_path(name).with_suffix(".starts"), {"digest": digest, "count": count})

    def all(self) -> list[BundleRecord]:
        return [self.load(n) for n in self.names()]

    def step(self, record: BundleRecord, step: str) -> None:
        """Record that the pending update completed `step` (one atomic write)."""
        assert step in STEPS and record.pending is not None
        p = record.pending
        record.pending = Pending(p.version, p.digest, p.archive_sha256, step, time.time())
        self.save(record)

    # -- plumbing ------------------------------------------------------------------------------
    @staticmethod
    def _read(path: pathlib.Path) -> dict[str, Any] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read agent state {path}: {e.strerror or e}") from None
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise StateError(f"agent state {path} is not JSON ({e}); it was not written by this agent") from None
        if not isinstance(doc, dict):
            raise StateError(f"agent state {path} is not a JSON object")
        return doc

    @staticmethod
    def _write(path: pathlib.Path, doc: dict[str, Any]) -> None:
        atomic_write_bytes(path, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n", mode=0o600)
