"""Typed errors of the agent's data plane.

Every error carries the status a transport answers with, so HTTP and MQTT map
the same failure to the same reply; the translation to a transport's own
response happens once, at that transport's edge, never in the domain code.

    AgentError                  root (500)
    ├── ModelNotFound           unknown model or version (404)
    ├── InvalidRequest          malformed body, wrong content type, bad protocol fields (400)
    │   └── ValidationError     the request disagrees with the model's signature (400)
    ├── Unauthorized            missing or wrong bearer token (401)
    ├── PayloadTooLarge         body or tensor over the configured limit (413)
    ├── Unavailable             not ready: draining, or model not loaded (503)
    │   └── Overloaded          bounded queue full; carries retry_after_s (503)
    ├── DeadlineExceeded        the request's deadline passed (504); also a TimeoutError
    ├── InferenceFailed         the engine failed on a request (500)
    └── ConfigError             bad serving configuration (refused at start)
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every agent error; `status` is an HTTP-style code any transport can use."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(AgentError):
    status = 404

    def __init__(self, model: str, version: str | None = None) -> None:
        what = f"model {model!r}" if version is None else f"model {model!r} version {version!r}"
        super().__init__(f"{what} is not served here")
        self.model = model
        self.version = version


class InvalidRequest(AgentError):
    status = 400


class ValidationError(InvalidRequest):
    """Names the tensor at fault and what the model expects."""

    def __init__(self, tensor: str, problem: str) -> None:
        super().__init__(f"input {tensor!r}: {problem}")
        self.tensor = tensor
        self.problem = problem


class Unauthorized(AgentError):
    status = 401


class PayloadTooLarge(AgentError):
    status = 413

    def __init__(self, size: int | None, limit: int, what: str = "request body") -> None:
        got = f"{size} bytes" if size is not None else "more bytes"
        super().__init__(f"{what} of {got} is over the {limit}-byte limit")
        self.size = size
        self.limit = limit


class Unavailable(AgentError):
    status = 503

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(Unavailable):
    def __init__(self, model: str, queued: int, limit: int, retry_after_s: float) -> None:
        super().__init__(
            f"model {model!r} is overloaded: {queued} requests queued, limit {limit}; retry later",
            retry_after_s,
        )
        self.model = model
        self.queued = queued
        self.limit = limit


class DeadlineExceeded(AgentError, TimeoutError):
    status = 504

    def __init__(self, model: str, timeout_ms: float | None = None, where: str = "") -> None:
        budget = f" of {timeout_ms:.0f} ms" if timeout_ms is not None else ""
        at = f" while {where}" if where else ""
        super().__init__(f"model {model!r}: deadline{budget} exceeded{at}")
        self.model = model


class InferenceFailed(AgentError):
    status = 500


class ConfigError(AgentError):
    status = 500
