"""The daemon's configuration file (TOML): every key, its default, and why.

`outpost agent run --config FILE` reads one TOML file; every key is optional
and a missing file section takes all its defaults. Unknown keys are refused
(a typo must not silently fall back to a default). Paths are relative to the
config file's directory. `agent/daemon/agent.example.toml` lists every key.

    [agent]
    state_dir = "state"            # all the agent writes: assignment state, installs, blobs, engine cache
    credential = ""                # device credential from `outpost agent enroll` ("": the enroll default path)
    fleet_key = ""                 # trusted fleet assignment key(s) PEM ("": fleet-assignment.pub beside credential)
    trust = []                     # publisher public keys bundles must be signed by (at least one)
    fleet_url = ""                 # override of the credential's fleet URL ("": the credential's)
    ca_file = ""                   # CA bundle for the fleet's TLS ("": system store)
    engine_cache = ""              # built engines ("": STATE_DIR/engines; systemd: its CacheDirectory=)

    [sync]
    long_poll_s = 25.0             # how long the fleet may hold an assignment poll open
    retry_base_s = 1.0             # backoff after a failed poll: full jitter up to base * 2^n ...
    retry_max_s = 60.0             # ... capped here
    report_period_s = 30.0         # heartbeat period
    report_buffer = 1000           # reports kept while the fleet is unreachable (oldest dropped)

    [update]
    disk_margin_bytes = 104857600  # free space required beyond a download's size
    retain_versions = 2            # installed versions kept per bundle beyond the active one (GC)
    health_runs = 5                # warm-up inferences the health gate times
    slo_margin = 1.5               # health gate: p95 of those runs <= manifest SLO p95 x this
    max_failed_starts = 3          # starts that did not reach "stable" before reverting to last-known-good
    stable_after_s = 30.0          # serving this long after a start resets the failed-start counter

    [server]                        # the HTTP edge, as `outpost serve`
    host = "127.0.0.1"
    port = 8000
    token = ""                     # require Authorization: Bearer TOKEN ("": none; loopback only then)
    drain_timeout_s = 20.0
    body_budget_wait_s = 5.0       # a body over the in-memory budget waits this long for room, then 503

    [model]                         # serving knobs of every model, as `outpost serve`
    instances = "auto"             # engine instances per model ("auto" or 0: per model at load, agent/instances.py)
    threads = "auto"               # intra-op threads per instance (0: one per core; "auto": cores split between them)
    max_queue = 128
    timeout_ms = 30000.0
    inline_compute_ms = 0.2

    [mqtt]                          # the MQTT front end, as `outpost serve --mqtt` ("" url: off)
    url = ""                       # mqtt://host[:port] or mqtts://host[:port]
    prefix = ""                    # topic prefix ("": outpost/DEVICE_ID, the device id from the credential)
    username = ""
    password = ""                  # prefer $OUTPOST_MQTT_PASSWORD
    ca_file = ""
    cert_file = ""
    key_file = ""
    qos = 1
    telemetry_s = 0.0              # publish health to PREFIX/telemetry this often (0: off)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import AUTO, ModelConfig, ServerConfig, instances_setting, threads_setting
from ..credentials import default_credential_path
from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FLEET_KEY_NAME = "fleet-assignment.pub"


@dataclass(frozen=True)
class SyncConfig:
    long_poll_s: float = 25.0
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    report_period_s: float = 30.0
    report_buffer: int = 1000


@dataclass(frozen=True)
class UpdateConfig:
    disk_margin_bytes: int = 100 << 20
    retain_versions: int = 2
    health_runs: int = 5
    slo_margin: float = 1.5
    max_failed_starts: int = 3
    stable_after_s: float = 30.0


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str = ""
    drain_timeout_s: float = 20.0
    body_budget_wait_s: float = 5.0


@dataclass(frozen=True)
class ServingConfig:
    #: "auto" or a number, as TOML gives it (a number arrives as its text); parsed by `agent.config`
    instances: str = AUTO
    threads: str = AUTO
    max_queue: int = 128
    timeout_ms: float = 30_000.0
    inline_compute_ms: float = 0.2

    def __post_init__(self) -> None:
        try:
            instances_setting(self.instances)
            threads_setting(self.threads)
        except ConfigError as e:
            raise ConfigError(f"[model].{e}") from None


@dataclass(frozen=True)
class MqttConfig:
    url: str = ""
    prefix: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    qos: int = 1
    telemetry_s: float = 0.0


@dataclass(frozen=True)
class AgentConfig:
    state_dir: pathlib.Path
    credential: pathlib.Path
    fleet_key: pathlib.Path
    trust: tuple[pathlib.Path, ...]
    fleet_url: str = ""
    ca_file: pathlib.Path | None = None
    #: where built engines are cached; None: state_dir / "engines"
    engine_cache: pathlib.Path | None = None
    sync: SyncConfig = field(default_factory=SyncConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)

    # -- derived locations under state_dir ----------------------------------------------
    @property
    def store_dir(self) -> pathlib.Path:
        return self.state_dir / "store"

    @property
    def installs_dir(self) -> pathlib.Path:
        return self.state_dir / "installs"

    @property
    def staging_dir(self) -> pathlib.Path:
        return self.state_dir / "staging"

    @property
    def engine_cache_dir(self) -> pathlib.Path:
        return self.engine_cache or self.state_dir / "engines"

    def model_config(self) -> ModelConfig:
        s = self.serving
        return ModelConfig(instances=instances_setting(s.instances), threads=threads_setting(s.threads),
                           max_queue=s.max_queue, timeout_ms=s.timeout_ms, inline_compute_ms=s.inline_compute_ms)

    def server_config(self) -> ServerConfig:
        h = self.http
        return ServerConfig(host=h.host, port=h.port, token=h.token or None, drain_timeout_s=h.drain_timeout_s,
                            body_budget_wait_s=h.body_budget_wait_s)


def _section(cls: type[Any], raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    values = {}
    for name, value in raw.items():
        default = getattr(cls(), name)
        if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # "auto"-or-number keys: their own parser names what is wrong
        if isinstance(default, bool) or not isinstance(value, (type(default), int)) or isinstance(value, bool):
            raise ConfigError(f"{where}.{name}: expected {type(default).__name__}, got {value!r}")
        values[name] = type(default)(value)
    return cls(**values)


def parse(doc: Mapping[str, Any], base_dir: pathlib.Path) -> AgentConfig:
    unknown = sorted(set(doc) - {"agent", "sync", "update", "server", "model", "mqtt"})
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}")
    agent = dict(doc.get("agent") or {})
    allowed = {"state_dir", "credential", "fleet_key", "trust", "fleet_url", "ca_file", "engine_cache"}
    if set(agent) - allowed:
        raise ConfigError(f"[agent]: unknown key(s) {', '.join(sorted(set(agent) - allowed))}")

    def path(value: Any, key: str) -> pathlib.Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"[agent].{key}: expected a non-empty path string")
        return (base_dir / os.path.expanduser(value)).resolve()

    credential = path(agent["credential"], "credential") if agent.get("credential") else default_credential_path()
    fleet_key = path(agent["fleet_key"], "fleet_key") if agent.get("fleet_key") else credential.parent / FLEET_KEY_NAME
    trust_raw = agent.get("trust", [])
    if not isinstance(trust_raw, list) or not trust_raw:
        raise ConfigError("[agent].trust: list at least one publisher public key; there is no unsigned mode")
    return AgentConfig(
        state_dir=path(agent.get("state_dir", "state"), "state_dir"),
        credential=credential, fleet_key=fleet_key,
        trust=tuple(path(t, "trust") for t in trust_raw),
        fleet_url=str(agent.get("fleet_url", "")),
        ca_file=path(agent["ca_file"], "ca_file") if agent.get("ca_file") else None,
        engine_cache=path(agent["engine_cache"], "engine_cache") if agent.get("engine_cache") else None,
        sync=_section(SyncConfig, doc.get("sync"), "[sync]"),
        update=_section(UpdateConfig, doc.get("update"), "[update]"),
        http=_section(HttpConfig, doc.get("server"), "[server]"),
        serving=_section(ServingConfig, doc.get("model"), "[model]"),
        mqtt=_mqtt(_section(MqttConfig, doc.get("mqtt"), "[mqtt]"), base_dir),
    )


def _mqtt(m: MqttConfig, base_dir: pathlib.Path) -> MqttConfig:
    def resolve(path: str) -> str:
        return str((base_dir / path).resolve()) if path else ""

    return dataclasses.replace(m, password=m.password or os.environ.get("OUTPOST_MQTT_PASSWORD", ""),
                               ca_file=resolve(m.ca_file), cert_file=resolve(m.cert_file),
                               key_file=resolve(m.key_file))


def load(path: str | os.PathLike[str]) -> AgentConfig:
    p = pathlib.Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read agent config {p}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"agent config {p} is not valid TOML: {e}") from None
    return parse(doc, p.absolute().parent)
