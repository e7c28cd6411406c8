"""A Runner owns one loaded model version's engine instances and runs them off the event loop.

Engines are blocking (and release the GIL), so each call goes to a worker
thread; one thread per instance, each taking a free instance from a pool, so
N instances means N batches computing at once and never two on one session.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bundle import TensorSpec, VerifiedBundle
from engines import Engine, EngineError, EngineOptions, open_engine

from .errors import InferenceFailed


@dataclass(frozen=True)
class RunResult:
    outputs: dict[str, np.ndarray]
    compute_s: float


class Runner:
    def __init__(self, model: str, engines: Sequence[Engine], backend: str, inline_compute_ms: float = 0.0,
                 *, parity_note: str | None = None) -> None:
        if not engines:
            raise ValueError("a runner needs at least one engine")
        self.model = model
        self.backend = backend
        #: None when the engine was checked against the ORT CPU reference; else why it was not
        self.parity_note = parity_note
        self.inputs: tuple[TensorSpec, ...] = engines[0].inputs
        self.outputs: tuple[TensorSpec, ...] = engines[0].outputs
        self.instances = len(engines)
        self._engines = list(engines)
        self._free: queue.SimpleQueue[Engine] = queue.SimpleQueue()
        for e in engines:
            self._free.put(e)
        self._pool = ThreadPoolExecutor(self.instances, thread_name_prefix=f"runner-{model}")
        self._inline_s = inline_compute_ms / 1000.0
        self._ewma_s = float("inf")  # unknown until measured: threads first
        self._closed = False

    @classmethod
    def open(cls, bundle: VerifiedBundle, model: str | None = None, *, instances: int = 1,
             options: EngineOptions | None = None, backend: str = "auto", cache_dir: str | None = None,
             inline_compute_ms: float = 0.0) -> Runner:
        """Load `instances` engines for one model of a verified bundle (blocking)."""
        entry = bundle.manifest.model(model)
        engines: list[Engine] = []
        chosen, note = backend, None
        try:
            for _ in range(instances):
                result = open_engine(bundle, entry.name, backend=backend, options=options, cache_dir=cache_dir)
                engines.append(result.engine)
                chosen, note = result.backend, result.parity_note
        except BaseException:
            for e in engines:
                e.close()
            raise
        return cls(entry.name, engines, chosen, inline_compute_ms, parity_note=note)

    def run_sync(self, feeds: Mapping[str, np.ndarray]) -> RunResult:
        engine = self._free.get()
        try:
            t0 = time.perf_counter()
            out = engine.infer(feeds)
            dt = time.perf_counter() - t0
        except EngineError as e:
            raise InferenceFailed(str(e)) from e
        finally:
            self._free.put(engine)
        self._observe(dt)
        return RunResult(out, dt)

    def _observe(self, dt: float) -> None:
        self._ewma_s = dt if self._ewma_s == float("inf") else 0.9 * self._ewma_s + 0.1 * dt

    def run_inline(self, feeds: Mapping[str, np.ndarray]) -> RunResult:
        """On the caller's thread with the first instance; only when no instance is busy (the batcher knows)."""
        t0 = time.perf_counter()
        try:
            out = self._engines[0].infer(feeds)
        except EngineError as e:
            raise InferenceFailed(str(e)) from e
        dt = time.perf_counter() - t0
        self._observe(dt)
        return RunResult(out, dt)

    async def run(self, feeds: Mapping[str, np.ndarray]) -> RunResult:
        if self._closed:
            raise InferenceFailed(f"model {self.model!r} is unloaded")
        if self.runs_inline:
            return self.run_sync(feeds)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.run_sync, feeds)

    @property
    def runs_inline(self) -> bool:
        """True while this model's engine time stays below the inline threshold."""
        return self._ewma_s < self._inline_s

    @property
    def mean_compute_s(self) -> float:
        """Recent engine time per batch (0 until measured); the batcher's Retry-After uses it."""
        return 0.0 if self._ewma_s == float("inf") else self._ewma_s

    def close(self) -> None:
        """Wait for running calls, then release every engine."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        for e in self._engines:
            e.close()
