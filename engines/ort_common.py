"""What the three ONNX Runtime backends share: session settings, loading, the optimized-model build.

Settings that matter for speed, and why they are what they are:

- threads: `intra_op_threads` (0 = one per physical core) and one inter-op
  thread, since served graphs are mostly sequential;
- spinning off by default (an idle agent must not burn cores; FIELD-NOTES);
- graph optimization: the build runs ORT's full optimizer once and saves the
  result (`optimized_model_filepath`) into the cache entry; a later load
  reads that model with optimization *off*, so a restart skips the optimizer;
- the CPU arena stays on (steady-state calls allocate nothing) unless the
  device is short of memory;
- on GPUs: IO binding, pinned host staging and a frugal CUDA arena (see
  `OrtGpuEngine`), exhaustive cuDNN algorithm search, TF32 only for fp16
  bundles (`cuda_provider_options`).

Every ONNX Runtime import happens inside a function: the module imports on a
machine without ONNX Runtime.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bundle import TensorSpec

from .backend import BuildContext, CompiledEngine, SkipReason
from .base import EngineOptions
from .errors import EngineBuildError, EngineLoadError, InferenceError
from .nontensor import as_tensors, converters
from .probe import HardwareInfo

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
OPTIMIZED_MODEL = "model.onnx"
OPTIMIZED_DATA = "model.onnx.data"
#: where a backend that cannot save an optimized model keeps its checked copy of the model's files
SOURCE_DIR = "source"

ProviderList = list[tuple[str, dict[str, Any]]]


def import_ort() -> Any:
    try:
        import onnxruntime as ort  # lazy: every module imports without a runtime
    except ImportError as e:
        raise EngineLoadError(f"onnxruntime is not installed: {e}") from e
    return ort


def session_options(options: EngineOptions, level: str | None = None) -> Any:
    ort = import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[level or options.graph_optimization])
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.enable_cpu_mem_arena = options.enable_cpu_mem_arena
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.allow_spinning else "0")
    so.log_severity_level = 3
    return so


def ort_unavailable(hw: HardwareInfo) -> SkipReason | None:
    if hw.onnxruntime_version is None:
        return SkipReason("not-installed", "onnxruntime is not installed (the `cpu` or `gpu` extra)")
    return None


class OrtEngine(CompiledEngine):
    """An ONNX Runtime session over a model file, with the providers a subclass names."""

    #: the provider that must end up first in the session, or the build failed
    primary_provider = "CPUExecutionProvider"
    #: whether the build saves ORT's optimized model into the cache entry
    saves_optimized_model = True

    def __init__(self, model_path: str | os.PathLike[str], inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], options: EngineOptions | None = None, *,
                 optimized: bool = False, providers: ProviderList | None = None) -> None:
        super().__init__(inputs, outputs)
        self.model_path = os.fspath(model_path)
        self.options = options or EngineOptions()
        #: True when `model_path` is ORT's own optimized model: load it without re-optimizing
        self.optimized = optimized
        self.providers: ProviderList = providers or [(self.primary_provider, {})]
        self._session: Any = None
        self._run: Any = None
        #: outputs that ORT returns as sequences/maps and that are served as tensors (ZipMap)
        self._convert = converters(self.outputs)

    # -- registry hooks ---------------------------------------------------------------
    @classmethod
    def runtime_versions(cls, hw: HardwareInfo) -> dict[str, str | None]:
        return {"onnxruntime": hw.onnxruntime_version}

    @classmethod
    def provider_list(cls, ctx: BuildContext, entry_dir: pathlib.Path) -> ProviderList:
        return [(cls.primary_provider, {})]

    @classmethod
    def build(cls, ctx: BuildContext, entry_dir: pathlib.Path) -> None:
        ort = import_ort()
        so = session_options(ctx.options)
        if cls.saves_optimized_model:
            so.optimized_model_filepath = str(entry_dir / OPTIMIZED_MODEL)
            # Weights always go to a file inside the entry: left to itself, ORT keeps a model's
            # external-data references pointing at the bundle, and a model over 2 GiB cannot be
            # one protobuf.
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", OPTIMIZED_DATA)
        providers = cls.provider_list(ctx, entry_dir)
        cls._check_providers(ort, providers)
        try:
            session = ort.InferenceSession(ctx.model_path, sess_options=so, providers=[p for p, _ in providers],
                                           provider_options=[o for _, o in providers])
        except Exception as e:  # ORT's pybind exceptions (Fail, InvalidGraph, NotImplemented...)
            raise EngineBuildError(f"{cls.backend}: {_first_line(e)}") from e
        cls._check_session(session)
        del session
        if not cls.saves_optimized_model and ctx.sources:  # later loads read the entry's copy, never the bundle
            for rel, _ in ctx.sources:
                dest = entry_dir / SOURCE_DIR / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(pathlib.Path(ctx.source_root) / rel, dest)

    @classmethod
    def from_entry(cls, ctx: BuildContext, entry_dir: pathlib.Path) -> OrtEngine:
        if cls.saves_optimized_model:
            path, optimized = entry_dir / OPTIMIZED_MODEL, True
        elif ctx.sources:
            path, optimized = entry_dir / SOURCE_DIR / ctx.model_file, False
        else:
            path, optimized = pathlib.Path(ctx.model_path), False
        return cls(path, ctx.inputs, ctx.outputs, ctx.options, optimized=optimized,
                   providers=cls.provider_list(ctx, entry_dir))

    @classmethod
    def _check_providers(cls, ort: Any, providers: ProviderList) -> None:
        available = set(ort.get_available_providers())
        missing = [p for p, _ in providers if p not in available]
        if missing:  # ORT would only warn and quietly run on the CPU
            raise EngineBuildError(f"{cls.backend}: this onnxruntime build lacks {', '.join(missing)}")

    @classmethod
    def _check_session(cls, session: Any) -> None:
        used = session.get_providers()
        if not used or used[0] != cls.primary_provider:
            raise EngineBuildError(f"{cls.backend}: {cls.primary_provider} did not initialise "
                                   f"(session runs on {used}); see the runtime's log")

    # -- engine hooks -------------------------------------------------------------------
    def load_impl(self) -> None:
        ort = import_ort()
        so = session_options(self.options, "disable" if self.optimized else None)
        try:
            self._check_providers(ort, self.providers)
            self._session = ort.InferenceSession(
                self.model_path, sess_options=so, providers=[p for p, _ in self.providers],
                provider_options=[o for _, o in self.providers],
            )
            self._check_session(self._session)
        except Exception as e:
            self._session = None
            raise EngineLoadError(f"{self.backend}: cannot load {self.model_path}: {_first_line(e)}") from e
        self._run = _fast_run(self._session)

    def infer_impl(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            results = dict(zip(outputs, self._run(outputs, feeds, None), strict=True))
            return as_tensors(results, self._convert) if self._convert else results
        except Exception as e:
            raise InferenceError(f"{self.backend}: {_first_line(e)}") from e

    def close_impl(self) -> None:
        self._session = self._run = None

    @classmethod
    def unavailable(cls, ctx: BuildContext) -> SkipReason | None:
        return ort_unavailable(ctx.hardware)


class OrtGpuEngine(OrtEngine):
    """ORT on a CUDA device, with IO binding (`EngineOptions.io_binding`).

    Inputs are bound from host memory and outputs are allocated on the device
    and copied back once, after the run, on ORT's stream: no per-output
    synchronisation inside `run`, and ORT's CUDA-pinned staging allocator does
    the host side of each copy. The CUDA arena grows by what is requested
    (`kSameAsRequested`), not in doubling chunks, so a small model does not
    reserve a large slice of a shared (Jetson: unified) memory.
    """

    uses_gpu = True

    def infer_impl(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if not self.options.io_binding:
            return super().infer_impl(feeds, outputs)
        try:
            io = self._session.io_binding()
            for name, arr in feeds.items():
                io.bind_cpu_input(name, np.ascontiguousarray(arr))
            for name in outputs:
                io.bind_output(name, "cuda", self.options.gpu_device_id)
            self._session.run_with_iobinding(io)
            results = io.copy_outputs_to_cpu()
        except Exception as e:
            raise InferenceError(f"{self.backend}: {_first_line(e)}") from e
        return dict(zip(outputs, results, strict=True))


def cuda_provider_options(ctx: BuildContext) -> dict[str, Any]:
    """CUDA EP settings: exhaustive cuDNN search once per process, an arena that
    grows only by what is asked, copies on the default stream (IO binding relies
    on it), and TF32 only when the bundle accepts reduced precision."""
    opts: dict[str, Any] = {
        "device_id": ctx.options.gpu_device_id,
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": "1",
        "use_tf32": "1" if ctx.precision == "fp16" else "0",
    }
    if ctx.options.gpu_mem_limit_bytes:
        opts["gpu_mem_limit"] = str(ctx.options.gpu_mem_limit_bytes)
    return opts


def _fast_run(session: Any) -> Any:
    """The compiled session's `run(output_names, feeds, run_options)`.

    `InferenceSession.run` re-checks the input names (the base class already
    did) and, when an execution provider fails, quietly rebuilds the session on
    the CPU (we want that failure to surface). Skipping the wrapper is what
    keeps a tiny model's call within a few percent of a hand-written
    `session.run` (bench/README.md). The public method is the fallback if a
    future ORT drops the attribute.
    """
    inner = getattr(session, "_sess", None)
    run = getattr(inner, "run", None)
    if callable(run):
        return run
    return lambda names, feeds, opts: session.run(list(names), dict(feeds), opts)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:500]
