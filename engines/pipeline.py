"""From a verified bundle to a loaded engine: plan, cache lookup, isolated first build, parity, load.

`plan()` does no work beyond probing and hashing a few cache entries: it says
which backends would be tried in which order, why the others are out, and
which already have a cache entry (`outpost engine inspect` prints it).
`open_engine()` walks the plan: a verified cache hit loads directly (no build,
no parity check, no child process); a miss builds under the key's lock in a
child process that also loads the engine, runs its first inference and the
parity check, and only then commits the entry. Each backend that fails adds a
`Fallback` and the walk moves on.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bundle import VerifiedBundle

from .backend import BuildContext
from .base import Engine, EngineOptions
from .cache import CacheKey, EngineCache
from .errors import BackendUnavailable, EngineError, EngineLoadError, ModelChanged
from .isolate import run_isolated
from .parity import generate_inputs
from .probe import Probe, SystemProbe
from .registry import AUTO, Fallback, backend_class, candidates
from .shapes import ShapeProfile, profile_for

log = logging.getLogger(__name__)

#: options that change what a build produces (threads and spinning do not)
_BUILD_OPTIONS = ("graph_optimization", "dim_ranges", "gpu_device_id", "gpu_mem_limit_bytes")


def default_cache_dir() -> pathlib.Path:
    """`$OUTPOST_ENGINE_CACHE`, else `$XDG_CACHE_HOME/outpost/engines` (`~/.cache/...`)."""
    explicit = os.environ.get("OUTPOST_ENGINE_CACHE")
    if explicit:
        return pathlib.Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "outpost" / "engines"


@dataclass(frozen=True)
class PlannedBackend:
    backend: str
    key: CacheKey
    #: True: a verified entry exists; False: a build is needed (`cache_note` says why when not plain
    #: absence); None: not looked up (open_engine looks when it gets there, hashing each entry once)
    cached: bool | None
    cache_note: str | None = None
    #: for a cached entry, its build's parity note when parity could not be checked
    parity_note: str | None = None


@dataclass(frozen=True)
class BuildPlan:
    model: str
    model_sha256: str
    precision: str
    profile: ShapeProfile
    context: BuildContext
    steps: tuple[PlannedBackend, ...]
    skipped: tuple[Fallback, ...]
    cache_root: pathlib.Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "precision": self.precision,
            "profile": self.profile.to_key(),
            "cache": str(self.cache_root),
            "hardware": self.context.hardware.to_dict(),
            "try": [{"backend": s.backend, "cached": s.cached, "cache_note": s.cache_note,
                     "parity_note": s.parity_note, "cache_entry": s.key.name} for s in self.steps],
            "skipped": [asdict(f) for f in self.skipped],
        }


@dataclass
class EngineResult:
    engine: Engine
    backend: str
    fallbacks: list[Fallback] = field(default_factory=list)
    cache_hit: bool = False
    #: the child build's report (parity errors, timings); None on a cache hit
    build: dict[str, Any] | None = None
    load_s: float = 0.0
    #: the parity report of the build behind this engine (also on a cache hit): `checked` False with
    #: a `note` when the model rejected every synthesized input
    parity: dict[str, Any] | None = None
    #: the fastest warm-up call's seconds (`EngineOptions.warmup_iterations`); None when there was none
    warmup_s: float | None = None
    #: seconds per item by batch size, measured by the build (`engines.batch_scaling`); None if not
    batch_scaling: dict[int, float] | None = None

    @property
    def parity_note(self) -> str | None:
        """None when parity was checked; else why not (what `engine inspect` and the agent show)."""
        if self.parity is None or self.parity.get("checked", True):
            return None
        return str(self.parity.get("note"))


def cache_key(ctx: BuildContext, backend: str, model_sha256: str) -> CacheKey:
    """`model_sha256` is the verified digest of the model file; external data's digests come from
    the context's sources."""
    cls = backend_class(backend)
    gpu = ctx.hardware.gpu if cls.uses_gpu else None
    opts = {k: getattr(ctx.options, k) for k in _BUILD_OPTIONS}
    runtimes = tuple(sorted(cls.runtime_versions(ctx.hardware).items()))
    return CacheKey(
        model_sha256=model_sha256,
        backend=backend,
        precision=ctx.precision,
        profile=tuple(tuple(d) for d in ctx.profile.to_key()),
        options=json.dumps(opts, sort_keys=True),
        gpu=gpu.name if gpu else None,
        compute_capability=gpu.compute_capability if gpu else None,
        runtimes=runtimes,
        data_sha256=tuple(sorted(digest for _, digest in ctx.sources[1:])),
    )


def _as_cache(cache_dir: str | os.PathLike[str] | EngineCache | None) -> EngineCache:
    if isinstance(cache_dir, EngineCache):
        return cache_dir
    return EngineCache(cache_dir if cache_dir is not None else default_cache_dir())


_default_probe: SystemProbe | None = None


def _probe(probe: Probe | None) -> Probe:
    """The hardware does not change under a running process: probe it once (NVML init, imports)."""
    global _default_probe
    if probe is not None:
        return probe
    if _default_probe is None:
        _default_probe = SystemProbe()
    return _default_probe


def plan(bundle: VerifiedBundle, model: str | None = None, backend: str = AUTO,
         options: EngineOptions | None = None, cache_dir: str | os.PathLike[str] | EngineCache | None = None,
         probe: Probe | None = None, *, check_cache: bool = True) -> BuildPlan:
    options = options or EngineOptions()
    manifest = bundle.manifest
    entry = manifest.model(model)
    hw = _probe(probe).detect()
    if hw.arch and hw.arch not in manifest.constraints.architectures:
        raise BackendUnavailable(f"this machine is {hw.arch}; the bundle is built for "
                                 f"{', '.join(manifest.constraints.architectures)}")
    overrides = {n: (lo, opt, hi) for n, lo, opt, hi in options.dim_ranges}
    profile = profile_for(entry.inputs, manifest.serving.batching.max_batch_size, overrides)
    ctx = BuildContext(str(bundle.model_path(entry.name)), entry.inputs, entry.outputs, options,
                       manifest.serving.precision, profile, hw, manifest.constraints.min_compute_capability,
                       str(bundle.root), bundle.model_sources(entry.name))
    chosen, skipped = candidates(backend, tuple(manifest.serving.engines), ctx)
    cache = _as_cache(cache_dir)
    steps = []
    for name in chosen:
        key = cache_key(ctx, name, entry.sha256)
        if check_cache:
            found = cache.lookup(key)
            parity = ((_build_of(found.meta) or {}).get("parity") or {}) if found.hit else {}
            note = None if parity.get("checked", True) else str(parity.get("note"))
            steps.append(PlannedBackend(name, key, found.hit, found.reason, note))
        else:
            steps.append(PlannedBackend(name, key, None))
    return BuildPlan(entry.name, entry.sha256, manifest.serving.precision, profile, ctx, tuple(steps),
                     tuple(skipped), cache.root)


def open_engine(bundle: VerifiedBundle, model: str | None = None, backend: str = AUTO,
                options: EngineOptions | None = None,
                cache_dir: str | os.PathLike[str] | EngineCache | None = None,
                probe: Probe | None = None) -> EngineResult:
    """Build (or load from cache) and load the best engine for one model of a verified bundle."""
    cache = _as_cache(cache_dir)
    the_plan = plan(bundle, model, backend, options, cache, probe, check_cache=False)
    samples = str(bundle.path(bundle.manifest.samples)) if bundle.manifest.samples else None
    if samples is not None and the_plan.model != bundle.manifest.models[0].name:
        samples = None  # samples.npz belongs to the bundle's first model
    fallbacks = list(the_plan.skipped)
    for step in the_plan.steps:
        try:
            return _realize(step, the_plan.context, cache, samples, fallbacks)
        except ModelChanged:
            raise  # the bytes are not the verified ones: no backend may build them
        except EngineError as e:
            log.warning("engine backend %s failed for %s: %s", step.backend, the_plan.model, e)
            reason = str(e).removeprefix(f"{step.backend}: ")
            fallbacks.append(Fallback(step.backend, reason, e.kind))
    reasons = "; ".join(f"{f.backend}: {f.reason}" for f in fallbacks) or "no backend is configured"
    raise BackendUnavailable(f"no engine could be built for model {the_plan.model}: {reasons}", fallbacks)


def _load(step: PlannedBackend, ctx: BuildContext, path: pathlib.Path,
          report: dict[str, Any] | None) -> tuple[Engine, float | None]:
    """The loaded engine, and its fastest warm-up call in seconds (None: no warm-up)."""
    engine = backend_class(step.backend).from_entry(ctx, path)
    engine.load()
    if not ctx.options.warmup_iterations:
        return engine, None
    parity = (report or {}).get("parity") or {}
    if parity.get("checked", True) is False:
        log.warning("%s engine for %s: warm-up skipped, %s", step.backend, ctx.model_file, parity.get("note"))
        return engine, None
    try:  # at the sizes the build's check ran with: synthesized defaults may be what the model rejects
        feeds = generate_inputs(ctx.inputs, ctx.profile, dims=parity.get("dims") or None)
        return engine, engine.warmup(feeds, ctx.options.warmup_iterations)
    except EngineError as e:
        engine.close()
        raise EngineLoadError(f"{step.backend}: warm-up failed: {e}") from e


def _note_unchecked(step: PlannedBackend, ctx: BuildContext, report: dict[str, Any] | None) -> None:
    parity = (report or {}).get("parity") or {}
    if parity.get("checked", True) is False:
        log.warning("%s engine for %s accepted with parity %s", step.backend, ctx.model_file, parity.get("note"))


def _realize(step: PlannedBackend, ctx: BuildContext, cache: EngineCache, samples: str | None,
             fallbacks: list[Fallback]) -> EngineResult:
    t0 = time.perf_counter()
    found = cache.lookup(step.key)
    if found.path is not None:
        try:
            loaded = _load(step, ctx, found.path, _build_of(found.meta))
        except EngineLoadError as e:  # verified yet unloadable: a runtime change the key missed
            log.warning("cached %s engine did not load (%s); rebuilding", step.backend, e)
        else:
            return _hit(step, ctx, cache, found.path, found.meta, loaded, fallbacks, t0)
    with cache.building(step.key, timeout_s=ctx.options.build_timeout_s * 2):
        found = cache.lookup(step.key)  # another process may have built it while we waited
        if found.path is not None:
            try:
                loaded = _load(step, ctx, found.path, _build_of(found.meta))
                return _hit(step, ctx, cache, found.path, found.meta, loaded, fallbacks, t0)
            except EngineLoadError:
                pass
        if found.reason:
            log.warning("engine cache entry %s is unusable (%s); rebuilding", step.key.name, found.reason)
        cache.remove(step.key)
        with cache.staging(step.key) as staging:
            payload = {"backend": step.backend, "context": ctx.to_dict(), "entry_dir": str(staging),
                       "samples": samples}
            report = run_isolated("engines.child:build_and_check", payload, ctx.options.build_timeout_s)
            if found.reason:
                report["replaced_entry"] = found.reason
            path = cache.commit(staging, step.key, report, built_from=report.get("built_from") or {})
    removed = cache.evict(keep=step.key)
    if removed:
        log.info("engine cache over its size bound: evicted %s", ", ".join(removed))
    _note_unchecked(step, ctx, report)
    engine, warmup_s = _load(step, ctx, path, report)
    return EngineResult(engine, step.backend, fallbacks, False, report, time.perf_counter() - t0, report["parity"],
                        warmup_s, _scaling(report))


def _build_of(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    build = (meta or {}).get("build")
    return build if isinstance(build, dict) else None


def _hit(step: PlannedBackend, ctx: BuildContext, cache: EngineCache, path: pathlib.Path,
         meta: dict[str, Any] | None, loaded: tuple[Engine, float | None], fallbacks: list[Fallback],
         t0: float) -> EngineResult:
    engine, warmup_s = loaded
    cache.touch(path)
    report = _build_of(meta)
    _note_unchecked(step, ctx, report)
    parity = (report or {}).get("parity")
    return EngineResult(engine, step.backend, fallbacks, True, None, time.perf_counter() - t0,
                        parity if isinstance(parity, dict) else None, warmup_s, _scaling(report))


def _scaling(report: dict[str, Any] | None) -> dict[int, float] | None:
    """The build's batch scaling; None for entries built before it was measured, or odd values."""
    raw = (report or {}).get("batch_scaling")
    if not isinstance(raw, dict):
        return None
    try:
        return {int(b): float(s) for b, s in raw.items()}
    except (TypeError, ValueError):
        return None
