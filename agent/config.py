"""Serving settings: small frozen objects, safe defaults, units in the names.

`ModelConfig` holds the per-device overrides of what a bundle's manifest says
(batching) and what the manifest cannot know (instances, queue bound, default
deadline). `ServerConfig` is the HTTP edge's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engines import EngineOptions

from .errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """How one model is served on this device.

    instances: engine instances (batches computing at once); None: decided per model at
      load (agent.instances: one on a GPU or for a tiny model, two for a compute-bound
      model on a multi-core CPU).
    threads: intra-op threads per instance, 0 one per core; None: decided with the
      instances (the cores split between them). Replaces engine_options.intra_op_threads.
    max_batch_size / max_queue_delay_ms: None keeps the bundle manifest's value.
    max_queue: requests waiting per model before new ones get 503 + Retry-After.
    max_request_items: a request whose own batch is above max_batch_size is split
      into engine batches up to this many items; above it, it is refused (400).
      None: 8 x max_batch_size.
    timeout_ms: deadline of a request that does not bring its own.
    allow_non_finite_inputs: NaN/Inf in float inputs are refused (400) unless set;
      a model fed NaN answers NaN, which hides the caller's bug.
    inline_compute_ms: batches whose engine time has stayed below this run on the
      event loop instead of a worker thread (the thread hand-off costs more than
      a tiny model's compute); 0 always uses threads. The price: such a batch cannot be
      abandoned at its deadline, which matters only if a sub-millisecond model hangs.
    """

    instances: int | None = None
    threads: int | None = None
    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    max_queue: int = 128
    max_request_items: int | None = None
    timeout_ms: float = 30_000.0
    allow_non_finite_inputs: bool = False
    inline_compute_ms: float = 0.2
    backend: str = "auto"
    engine_options: EngineOptions = field(default_factory=EngineOptions)

    def __post_init__(self) -> None:
        if self.instances is not None and self.instances < 1:
            raise ConfigError(f"instances must be >= 1 (or None: auto), got {self.instances}")
        if self.threads is not None and self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (or None: auto), got {self.threads}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_ms is not None and self.max_queue_delay_ms < 0:
            raise ConfigError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.timeout_ms <= 0:
            raise ConfigError(f"timeout_ms must be > 0, got {self.timeout_ms}")


AUTO = "auto"


def instances_setting(value: object) -> int | None:
    """`--instances` / `[model] instances`: "auto" or 0 decide per model (None); 1..64 is kept."""
    return _auto_int(value, "instances", 0, 64, zero_is_auto=True)


def threads_setting(value: object) -> int | None:
    """`--threads` / `[model] threads`: "auto" decides with the instances (None); 0 is one per core."""
    return _auto_int(value, "threads", 0, 256, zero_is_auto=False)


def _auto_int(value: object, what: str, lo: int, hi: int, *, zero_is_auto: bool) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    try:
        n = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    except ValueError:
        n = None
    if n is None or not lo <= n <= hi:
        raise ConfigError(f"{what} must be \"auto\" or a whole number from {lo} to {hi}, got {value!r}")
    return None if zero_is_auto and n == 0 else n


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP edge. Loopback by default: anything wider should set a token and TLS."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 64 << 20
    #: request bodies held at once (reserved before reading); beyond it 503 + Retry-After.
    #: None: 2 x max_body_bytes. JSON decoding costs ~4x a body's size on top, one big body at a time.
    max_inflight_body_bytes: int | None = None
    #: a body that does not fit that budget waits for room (first come, first served) this long at most, or
    #: less if its deadline is nearer, then gets 503 + Retry-After; 0 refuses at once. 5 s: room comes back
    #: as answers are built, and a budget's worth of big bodies is answered in about a second here (a 60 MB
    #: JSON body decodes in ~0.13 s, a 3.1 MB image in ~12 ms of CPU; bench/README.md), so 5 s spans several
    #: turnovers even on a slower device and is longer than the Retry-After a refused client would wait and
    #: then resend its whole body after. A request still waiting then meets an overload, not a burst, and is
    #: told so rather than held to its 30 s deadline while a connection per waiter piles up.
    body_budget_wait_s: float = 5.0
    #: open connections; one more is answered 503 and closed
    max_connections: int = 1024
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: a body must arrive within this; trickling clients are cut off (slowloris)
    body_timeout_s: float = 30.0
    #: idle keep-alive connections are closed after this
    keepalive_timeout_s: float = 15.0
    #: on SIGTERM: stop taking requests, finish in-flight ones for at most this long
    drain_timeout_s: float = 20.0
    max_line_bytes: int = 8190
    max_field_bytes: int = 8190
    max_headers: int = 64
    access_log: bool = False
    #: [shm] Triton's system shared-memory extension (agent.shm); off: clients could name any object in /dev/shm
    shared_memory: bool = False

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both a certificate and a key")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_inflight_body_bytes is not None and self.max_inflight_body_bytes < self.max_body_bytes:
            raise ConfigError(f"max_inflight_body_bytes ({self.max_inflight_body_bytes}) must be at least "
                              f"max_body_bytes ({self.max_body_bytes}), or a maximal body is never admitted")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections must be >= 1, got {self.max_connections}")
        if not self.body_budget_wait_s >= 0:
            raise ConfigError(f"body_budget_wait_s must be >= 0, got {self.body_budget_wait_s}")

    @property
    def body_budget_bytes(self) -> int:
        return self.max_inflight_body_bytes or 2 * self.max_body_bytes
