"""The engine interface every backend implements, Polygraphy-style.

The base class owns the public `load / infer / close` (state checks, input
name checks) and a backend overrides only the small `*_impl` hooks. `infer`
is blocking and thread-safe (the runtimes release the GIL): callers on an
event loop run it in a worker thread. Inputs are assumed already validated
against the signature by the caller (the agent's data plane); the engine
only checks that it got exactly the names it needs.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bundle import TensorSpec

from .errors import EngineError, InferenceError


@dataclass(frozen=True)
class EngineOptions:
    """Session settings that matter for speed, chosen deliberately.

    intra_op_threads: 0 = the runtime's default (one per physical core).
    allow_spinning: ORT spins its threads between calls by default, which
      burns a core or two at idle on a shared edge device; off by default here
      (about 30% less throughput on tiny models, see FIELD-NOTES).
    graph_optimization: the level the engine is *built* with; a cached CPU
      engine is ORT's already-optimized model, loaded with optimization off.
    enable_cpu_mem_arena: ORT's arena keeps freed buffers for the next call
      (fast, but memory only grows); turn off on tight devices.
    dim_ranges: (name, min, opt, max) for dynamic dims other than the batch
      dim; they shape TensorRT's optimization profile and the parity inputs.
    gpu_device_id: the CUDA device every GPU backend builds for and runs on.
    gpu_mem_limit_bytes: 0 = no limit; caps ORT's CUDA arena and TensorRT's
      builder workspace, so a build cannot starve other work on the device.
    io_binding: ORT GPU backends bind inputs and outputs explicitly, so the
      host/device copies happen once per call on ORT's own stream.
    build_timeout_s: a first build (in a child process) that takes longer is
      killed and reported as a failed build; TensorRT builds of big models
      take minutes on Jetson-class devices.
    warmup_iterations: requests run on generated inputs right after loading,
      so that lazy allocations and per-process autotuning (cuDNN's algorithm
      search, TensorRT's context set-up) happen before the first user
      request; 0 on the CPU, where there is nothing worth warming.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    allow_spinning: bool = False
    graph_optimization: str = "all"  # "disable" | "basic" | "extended" | "all"
    enable_cpu_mem_arena: bool = True
    dim_ranges: tuple[tuple[str, int, int, int], ...] = ()
    gpu_device_id: int = 0
    gpu_mem_limit_bytes: int = 0
    io_binding: bool = True
    build_timeout_s: float = 900.0
    warmup_iterations: int = 0


class Engine(abc.ABC):
    """A loaded model ready to run on one backend."""

    #: registry name, e.g. "ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt"
    backend: str = ""
    #: whether it computes on a GPU (the cache key includes the GPU; the agent gives it one instance)
    uses_gpu: bool = False

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.inputs: tuple[TensorSpec, ...] = tuple(inputs)
        self.outputs: tuple[TensorSpec, ...] = tuple(outputs)
        self._loaded = False
        self._input_names = frozenset(t.name for t in self.inputs)
        self._output_names = tuple(t.name for t in self.outputs)

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        if not self._loaded:
            self.load_impl()
            self._loaded = True

    def infer(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one (possibly batched) request; returns the requested outputs by name."""
        if not self._loaded:
            raise EngineError(f"{self.backend} engine is not loaded")
        if feeds.keys() != self._input_names:
            raise InferenceError(
                f"expected inputs {sorted(self._input_names)}, got {sorted(feeds)}"
            )
        if not outputs:  # the common case stays a few attribute reads (see bench/README.md)
            return self.infer_impl(feeds, self._output_names)
        wanted = tuple(outputs)
        unknown = [o for o in wanted if o not in self._output_names]
        if unknown:
            raise InferenceError(f"unknown outputs {unknown}; the model has {list(self._output_names)}")
        return self.infer_impl(feeds, wanted)

    def warmup(self, feeds: Mapping[str, np.ndarray], iterations: int = 1) -> float:
        """Run a few requests before serving: lazy allocations and kernel autotuning
        (cuDNN, TensorRT tactics) happen here rather than in a user's first request.

        Returns the fastest call's seconds: the warmed engine's time per batch at
        these sizes (the agent sizes a model's instances from it)."""
        best = float("inf")
        for _ in range(iterations):
            t0 = time.perf_counter()
            self.infer(feeds)
            best = min(best, time.perf_counter() - t0)
        return best

    def close(self) -> None:
        if self._loaded:
            self.close_impl()
            self._loaded = False

    def __enter__(self) -> Engine:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def load_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def close_impl(self) -> None: ...
