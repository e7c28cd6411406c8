"""The device credential: which fleet, which device, and the bearer secret, in one 0600 file.

Written once by `outpost agent enroll`, read by the daemon at start. The file
is created with mode 0600 before a byte of the secret is written, then
fsynced and renamed over the target (and the directory fsynced), so no other
user can ever read it and a crash leaves the old credential or the new one.
A credential file readable by group or others is refused, as ssh does. The
secret never appears in a repr, a log line or an error message.
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bundle import fsync_dir

from .fleet_errors import CredentialError

FORMAT = 1
MAX_FILE_BYTES = 64 * 1024
ENV_PATH = "OUTPOST_AGENT_CREDENTIAL"


@dataclass(frozen=True)
class Credential:
    fleet_url: str
    device_id: str
    secret: str = field(repr=False)
    labels: Mapping[str, str] = field(default_factory=dict)
    enrolled_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "fleet_url": self.fleet_url, "device_id": self.device_id,
                "credential": self.secret, "labels": dict(self.labels), "enrolled_at": self.enrolled_at}


def default_credential_path() -> pathlib.Path:
    """$OUTPOST_AGENT_CREDENTIAL, else /var/lib/outpost/credential.json for root, else under the user's data dir."""
    env = os.environ.get(ENV_PATH)
    if env:
        return pathlib.Path(env)
    if os.geteuid() == 0:
        return pathlib.Path("/var/lib/outpost/credential.json")
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return pathlib.Path(base) / "outpost" / "agent" / "credential.json"


def save_credential(path: str | os.PathLike[str], credential: Credential) -> pathlib.Path:
    target = pathlib.Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = json.dumps(credential.to_json(), indent=2).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(prefix=".credential-", dir=target.parent)
    try:
        os.fchmod(fd, 0o600)  # before the secret is written
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def load_credential(path: str | os.PathLike[str]) -> Credential:
    p = pathlib.Path(path)
    try:
        with open(p, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise CredentialError(f"{p}: no credential; enroll first (outpost agent enroll --fleet URL --token T)") \
            from None
    except OSError as e:
        raise CredentialError(f"{p}: cannot read the credential: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialError(f"{p}: credential readable by others (mode {mode & 0o777:o}); chmod 600 it")
    if len(raw) > MAX_FILE_BYTES:
        raise CredentialError(f"{p}: larger than {MAX_FILE_BYTES} bytes; not a credential file")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise CredentialError(f"{p}: not JSON; enroll again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CredentialError(f"{p}: not a format-{FORMAT} credential file; enroll again")
    fields = ("fleet_url", "device_id", "credential")
    if not all(isinstance(doc.get(k), str) and doc[k] for k in fields):
        raise CredentialError(f"{p}: missing one of {', '.join(fields)}; enroll again")
    labels = doc.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise CredentialError(f"{p}: labels must be an object of strings")
    enrolled_at = doc.get("enrolled_at", 0.0)
    return Credential(doc["fleet_url"], doc["device_id"], doc["credential"], labels,
                      float(enrolled_at) if isinstance(enrolled_at, (int, float)) else 0.0)
