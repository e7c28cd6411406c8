"""A Runner owns one loaded model version's engine instances and runs them off the event loop.

Engines are blocking (and release the GIL), so each call goes to a worker
thread; one thread per instance, each taking a free instance from a pool, so
N instances means N batches computing at once and never two on one session.
"""

from __future__ import annotations

import asyncio
import os
import queue
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from bundle import TensorSpec, VerifiedBundle
from engines import Engine, EngineCache, EngineError, EngineOptions, EngineResult, Fallback, Probe, open_engine

from .errors import InferenceFailed
from .instances import Placement, available_cores, available_memory, choose


class EngineFactory(Protocol):
    """How a runner gets an engine: `engines.open_engine` in production; tests hand in a wrapper."""

    def __call__(self, bundle: VerifiedBundle, model: str | None = None, backend: str = ...,
                 options: EngineOptions | None = None,
                 cache_dir: str | os.PathLike[str] | EngineCache | None = None,
                 probe: Probe | None = None) -> EngineResult: ...


@dataclass(frozen=True)
class EngineSource:
    """Where engines come from: the factory, the cache directory and the hardware probe, handed in.

    `cache_dir=None` means the engines package's default (the user's cache);
    the daemon and every test hand in their own directory.
    """

    factory: EngineFactory = open_engine
    cache_dir: str | os.PathLike[str] | EngineCache | None = None
    probe: Probe | None = None


@dataclass(slots=True)
class RunResult:
    outputs: dict[str, np.ndarray]
    compute_s: float


class Runner:
    def __init__(self, model: str, engines: Sequence[Engine], backend: str, inline_compute_ms: float = 0.0,
                 *, parity_note: str | None = None, fallbacks: Sequence[Fallback] = (),
                 placement: Placement | None = None, batch_scaling: Mapping[int, float] | None = None) -> None:
        if not engines:
            raise ValueError("a runner needs at least one engine")
        self.model = model
        self.backend = backend
        #: None when the engine was checked against the ORT CPU reference; else why it was not
        self.parity_note = parity_note
        #: backends tried before the chosen one, and why each was out (reported to the fleet)
        self.fallbacks: tuple[Fallback, ...] = tuple(fallbacks)
        self.inputs: tuple[TensorSpec, ...] = engines[0].inputs
        self.outputs: tuple[TensorSpec, ...] = engines[0].outputs
        self.instances = len(engines)
        #: instances and intra-op threads each, and why (metadata, the load log line)
        self.placement = placement or Placement(self.instances, 0, "explicit")
        #: seconds per item by batch size, as the engine's build measured it (None: not measured)
        self.batch_scaling = dict(batch_scaling) if batch_scaling else None
        self._engines = list(engines)
        self._free: queue.SimpleQueue[Engine] = queue.SimpleQueue()
        for e in engines:
            self._free.put(e)
        self._pool = ThreadPoolExecutor(self.instances, thread_name_prefix=f"runner-{model}")
        self._inline_s = inline_compute_ms / 1000.0
        #: batches whose engine time stays below this (ms) run on the event loop (shown in the metadata)
        self.inline_compute_ms = inline_compute_ms
        self._ewma_s = float("inf")  # unknown until measured: threads first
        self._closed = False

    @classmethod
    def open(cls, bundle: VerifiedBundle, model: str | None = None, *, instances: int | None = 1,
             threads: int | None = None, options: EngineOptions | None = None, backend: str = "auto",
             source: EngineSource | None = None, inline_compute_ms: float = 0.0) -> Runner:
        """Load the engines of one model of a verified bundle (blocking).

        `instances` / `threads` (intra-op threads per instance; 0 one per core):
        a number is kept, None is decided by `agent.instances.choose` once the
        first engine is loaded, from its kind, its build's time per batch
        (`engines.batch_scaling`), the cores and the memory. Deciding may load that first engine twice: it is
        warmed with the given threads, and replaced if the decision differs
        (a cache hit, so a second session's load, not a build).
        """
        source = source or EngineSource()
        options = options or EngineOptions()
        if threads is not None:
            options = replace(options, intra_op_threads=threads)
        entry = bundle.manifest.model(model)
        engines: list[Engine] = []

        def load(opts: EngineOptions) -> EngineResult:
            result = source.factory(bundle, entry.name, backend=backend, options=opts,
                                    cache_dir=source.cache_dir, probe=source.probe)
            engines.append(result.engine)
            return result

        try:
            if instances is not None and threads is not None:
                placement = Placement(instances, threads, "explicit")
                first = load(options)
            else:
                first = load(options)
                # how compute-bound the model is: its build's batch-1 time (no extra warm-up here: that
                # would leave a batch's arena in this long-lived process), else the configured warm-up's
                batch_s = (first.batch_scaling or {}).get(1) or first.warmup_s
                placement = choose(
                    uses_gpu=first.engine.uses_gpu, cores=available_cores(), batch_s=batch_s,
                    model_bytes=sum(bundle.files[rel].size for rel, _ in bundle.model_sources(entry.name)),
                    available_bytes=available_memory(), instances=instances, threads=threads)
                if placement.threads != options.intra_op_threads:  # the first one has the wrong thread count
                    engines.pop().close()
                    options = replace(options, intra_op_threads=placement.threads)
                    first = load(options)
            while len(engines) < placement.instances:
                load(options)
        except BaseException:
            for e in engines:
                e.close()
            raise
        return cls(entry.name, engines, first.backend, inline_compute_ms, parity_note=first.parity_note,
                   fallbacks=first.fallbacks, placement=placement, batch_scaling=first.batch_scaling)

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
