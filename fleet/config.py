"""Configuration of the fleet server and of its CLI client, as frozen dataclasses.

Units are in the names. Defaults are the embedded zero-set-up fleet: a SQLite
file and a blob directory under the data directory, bound to loopback.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field

DEFAULT_PORT = 8780
ENV_URL = "OUTPOST_FLEET_URL"
ENV_TOKEN = "OUTPOST_FLEET_TOKEN"
ENV_DB = "OUTPOST_FLEET_DB"
ENV_CONFIG = "OUTPOST_FLEET_CONFIG"


def default_db_url(data_dir: pathlib.Path) -> str:
    return f"sqlite+aiosqlite:///{(data_dir / 'fleet.db').absolute()}"


def normalise_db_url(url: str) -> str:
    """Accept the plain forms people type and pick the async driver for them."""
    for plain, driver in (("sqlite://", "sqlite+aiosqlite://"), ("postgresql://", "postgresql+asyncpg://"),
                          ("postgres://", "postgresql+asyncpg://")):
        if url.startswith(plain):
            return driver + url[len(plain):]
    return url


@dataclass(frozen=True)
class RetentionConfig:
    #: Raw telemetry windows are kept this long, then folded into hourly points.
    raw_retention_s: float = 24 * 3600
    downsample_bucket_s: int = 3600
    #: Hourly points are kept this long, then dropped.
    downsampled_retention_s: float = 30 * 24 * 3600
    maintenance_interval_s: float = 300


@dataclass(frozen=True)
class RolloutConfig:
    #: How often the rollout engine evaluates gates; keep it at or under the devices' report period.
    eval_interval_s: float = 5.0
    #: A process that stops renewing its lease on a rollout loses it after this long.
    lease_s: float = 30.0
    #: mqtt://host:port (or mqtts://) of a broker the devices listen on; empty: no nudges.
    nudge_mqtt_url: str = ""
    #: Topic per device: the fleet publishes {"serial": N} there when its assignment changed.
    nudge_topic: str = "outpost/devices/{device_id}/nudge"


@dataclass(frozen=True)
class ServerConfig:
    data_dir: pathlib.Path
    #: SQLAlchemy URL of the database; the plain forms people type are accepted and given their
    #: async driver on construction, and empty means the SQLite file under `data_dir`.
    db_url: str = ""
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: Release public keys a pushed bundle must be signed by (plus DATA/trust/*.pub).
    trust_keys: tuple[pathlib.Path, ...] = ()
    max_bundle_bytes: int = 2 << 30
    max_json_body_bytes: int = 1 << 20
    #: Lifetime of a served assignment document; the agent refuses it afterwards.
    assignment_ttl_s: float = 24 * 3600
    long_poll_max_s: float = 60.0
    long_poll_default_s: float = 30.0
    #: How often a process looks in the database for assignment changes made by others.
    change_poll_s: float = 1.0
    enroll_attempts_per_minute: int = 30
    #: How long a verified credential is trusted without asking the database again. Revocations
    #: reach every process within `change_poll_s` anyway; this bounds trust when they cannot.
    credential_cache_s: float = 600.0
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    rollouts: RolloutConfig = field(default_factory=RolloutConfig)
    #: PEM certificate chain and key: the fleet then serves HTTPS only.
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None

    def __post_init__(self) -> None:
        url = normalise_db_url(self.db_url) if self.db_url else default_db_url(self.data_dir)
        object.__setattr__(self, "db_url", url)  # frozen: the one normalised spelling, set once

    @property
    def blob_dir(self) -> pathlib.Path:
        return self.data_dir / "blobs"

    @property
    def key_dir(self) -> pathlib.Path:
        return self.data_dir / "keys"

    def trusted_key_paths(self) -> list[pathlib.Path]:
        extra = sorted((self.data_dir / "trust").glob("*.pub")) if (self.data_dir / "trust").is_dir() else []
        return [*self.trust_keys, *extra]


@dataclass(frozen=True)
class ClientConfig:
    url: str
    token: str
    timeout_s: float = 300.0


def default_client_config_path() -> pathlib.Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return pathlib.Path(base) / "outpost" / "fleet.json"


def load_client_config(url: str | None, token: str | None, config_path: str | None) -> ClientConfig:
    """Flags win over the environment, which wins over the config file."""
    path = pathlib.Path(config_path or os.environ.get(ENV_CONFIG) or default_client_config_path())
    stored: dict[str, str] = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            raw = {}
        if isinstance(raw, dict):
            stored = {k: v for k, v in raw.items() if isinstance(v, str)}
    return ClientConfig(
        url=(url or os.environ.get(ENV_URL) or stored.get("url") or f"http://127.0.0.1:{DEFAULT_PORT}").rstrip("/"),
        token=token or os.environ.get(ENV_TOKEN) or stored.get("token") or "",
    )
