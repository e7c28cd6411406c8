"""Typed errors of the engines package.

    EngineError                 root
    ├── BackendUnavailable      runtime not installed / no GPU / constraint unmet
    ├── EngineBuildError        parser or builder failed
    │   ├── ModelChanged        the model's bytes differ from what verification vouched for
    │   ├── ParityError         engine output disagrees with the ORT CPU reference
    │   ├── BuildCrashed        the isolated first build died (segfault, abort)
    │   ├── BuildTimeout        the isolated first build ran past build_timeout_s
    │   └── OutOfMemory         the build or first inference ran out of host or device memory
    ├── EngineLoadError         a built engine could not be loaded
    ├── InferenceError          the runtime failed on a request (bad shapes that
    │                           slipped past validation, OOM, ...)
    └── CacheError              the on-disk engine cache is unusable

Each class carries `kind`, the short tag a `Fallback` records and the fleet
aggregates, so the tag follows from the error's type and from nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class EngineError(Exception):
    """Root of every engines error."""

    kind = "error"


class BackendUnavailable(EngineError):
    kind = "unavailable"

    def __init__(self, message: str, fallbacks: Sequence[Any] = ()) -> None:
        super().__init__(message)
        #: when no backend could serve at all: every `engines.Fallback` on the way (for the fleet)
        self.fallbacks: tuple[Any, ...] = tuple(fallbacks)


class EngineBuildError(EngineError):
    kind = "build-failed"


class ModelChanged(EngineBuildError):
    kind = "model-changed"


class ParityError(EngineBuildError):
    kind = "parity"


class BuildCrashed(EngineBuildError):
    kind = "crashed"


class BuildTimeout(EngineBuildError, TimeoutError):
    kind = "timeout"


class OutOfMemory(EngineBuildError, MemoryError):
    kind = "out-of-memory"


class EngineLoadError(EngineError):
    kind = "load-failed"


class InferenceError(EngineError):
    kind = "inference-failed"


class CacheError(EngineError):
    kind = "cache"
