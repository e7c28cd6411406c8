"""The transport-neutral core: one data plane that HTTP and MQTT both call.

A transport parses its message into an `InferRequest` (agent.protocol), calls
`DataPlane.infer`, and serialises the `InferResponse`, or maps the raised
`AgentError` through its `status`. Everything in between lives here: model
lookup, validation against the signature, the batch queue, deadlines and
metrics, so both transports behave the same on every request.

Naming: a bundle with one model is served under the bundle's name; a bundle
with several serves each as `<bundle>.<model>`. The version is the bundle's
version; a request without one goes to the model's *active* version.

Changing what is served (zero-downtime switch):

    prepared = await asyncio.to_thread(dp.prepare, bundle, config)   # off the loop: engines built, warmed
    await dp.swap(prepared)                                           # on the loop: pointer moves, old drains

The model table and the active-version pointers are only ever written on the
event loop (`swap`, `activate`, `unload`), so a request sees one consistent
table. `swap` points each model name at the new version in one step: new
requests go there at once, while requests already queued or running on the
old version finish on it; only then is the old one closed (unless kept
loaded for an instant switch back, `keep_previous=True`). `activate` points a
name back at a version still loaded, which is how last-known-good is
restored. Models whose load failed are recorded in `failed` with the reason,
so health and the fleet report can say why a model is missing.

Deadlines are absolute `time.monotonic()` seconds (`deadline_after(ms)` makes
one); None applies the model's default `timeout_ms`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as _pkg_metadata
from typing import Any

from bundle import UNVERIFIED, Manifest, ModelEntry, TensorSpec, VerifiedBundle
from engines import batch_scaling
from runtime.timeouts import timeout

from .batching import AdaptiveBatcher
from .config import ModelConfig
from .errors import AgentError, ModelNotFound, Unavailable
from .metrics import ModelMetrics, ServingMetrics, TailLatency
from .protocol import SPEC_DATATYPES, InferRequest, InferResponse, build_response, count_non_finite
from .runner import EngineSource, Runner
from .validation import Validator, batch_dim

log = logging.getLogger(__name__)
SERVER_NAME = "outpost"
EXTENSIONS = ("binary_tensor_data",)


def _version() -> str:
    try:
        return _pkg_metadata.version("outpost")
    except _pkg_metadata.PackageNotFoundError:
        return "0"


def deadline_after(timeout_ms: float) -> float:
    return time.monotonic() + timeout_ms / 1000.0


@dataclass
class ServedModel:
    """One model version being served, with everything a request passes through."""

    name: str
    version: str
    release: int
    bundle: VerifiedBundle
    config: ModelConfig
    runner: Runner
    batcher: AdaptiveBatcher
    validator: Validator
    metrics: ModelMetrics
    max_batch_size: int
    max_queue_delay_ms: float
    #: requests that entered this version and have not answered (drain waits for 0)
    active_requests: int = 0
    idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.active_requests += 1

    def leave(self) -> None:
        self.active_requests -= 1
        if self.active_requests == 0 and self.idle is not None:
            self.idle.set()

    async def drained(self, timeout_s: float | None) -> bool:
        """Wait until no request is inside this version; False at the timeout."""
        if self.active_requests == 0:
            return True
        self.idle = asyncio.Event()
        try:
            async with timeout(timeout_s):
                await self.idle.wait()
        except asyncio.TimeoutError:
            return self.active_requests == 0
        return True

    @property
    def verified(self) -> bool:
        return self.bundle.signer != UNVERIFIED

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        note = self.runner.parity_note
        outpost: dict[str, Any] = {
            "bundle": self.bundle.manifest.ref, "digest": self.bundle.digest, "signer": self.bundle.signer,
            "verified": self.verified, "ready": True, "backend": self.runner.backend,
            "instances": self.runner.instances, "threads": self.runner.placement.threads,
            "placement": self.runner.placement.reason, "inline_compute_ms": self.runner.inline_compute_ms,
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_ms": self.max_queue_delay_ms, "max_queue": self.config.max_queue,
            "parity": {"checked": note is None, "note": note},
            # what max_batch_size was capped by: the build's seconds per item by batch size
            "batch_scaling": ({str(b): s for b, s in sorted(self.runner.batch_scaling.items())}
                              if self.runner.batch_scaling else None),
        }
        labels = _labels(self.runner.outputs)
        if labels:
            outpost["labels"] = labels
        return _metadata_doc(self.name, versions, self.runner.inputs, self.runner.outputs, outpost)


def _tensor_doc(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "datatype": SPEC_DATATYPES.get(t.dtype, t.dtype),
            "shape": [d if isinstance(d, int) else -1 for d in t.shape]}


def _labels(outputs: Sequence[TensorSpec]) -> dict[str, list[int | str]]:
    """Output name -> the class labels of its columns, for outputs served from a ZipMap."""
    return {t.name: list(t.source.labels) for t in outputs if t.source is not None}


def _metadata_doc(name: str, versions: list[str], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                  outpost: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "versions": versions, "platform": "onnxruntime_onnx",
            "inputs": [_tensor_doc(t) for t in inputs], "outputs": [_tensor_doc(t) for t in outputs],
            "outpost": outpost}


@dataclass(frozen=True)
class FailedModel:
    """A model `serve` was asked for that did not load: not served, reported (ready 503, metadata)."""

    name: str
    version: str
    bundle: VerifiedBundle
    entry: ModelEntry
    reason: str

    def metadata(self) -> dict[str, Any]:
        return _metadata_doc(self.name, [self.version], self.entry.inputs, self.entry.outputs, {
            "bundle": self.bundle.manifest.ref, "digest": self.bundle.digest, "signer": self.bundle.signer,
            "verified": self.bundle.signer != UNVERIFIED, "ready": False, "state": "failed", "error": self.reason,
        })


def _scaling_text(per_item: Mapping[int, float] | None) -> str:
    return ", ".join(f"batch {b} {s * 1e3:.3g} ms" for b, s in sorted((per_item or {}).items()))


def served_names(manifest: Manifest) -> list[tuple[ModelEntry, str]]:
    """(model entry, served name) of every model of a bundle: the bundle's name for a one-model
    bundle, `<bundle>.<model>` for each of several."""
    several = len(manifest.models) > 1
    return [(m, f"{manifest.name}.{m.name}" if several else manifest.name) for m in manifest.models]


@dataclass(frozen=True)
class PreparedVersion:
    """Every model of one bundle version, loaded and warm, not yet routed to (see `DataPlane.swap`)."""

    bundle: VerifiedBundle
    models: tuple[ServedModel, ...]

    @property
    def ref(self) -> str:
        return self.bundle.manifest.ref

    def close(self) -> None:
        """Release a prepared version that will not be swapped in (blocking)."""
        for sm in self.models:
            sm.runner.close()


class DataPlane:
    def __init__(self, metrics: ServingMetrics | None = None, *, name: str = SERVER_NAME,
                 engines: EngineSource | None = None, drain_timeout_s: float = 60.0) -> None:
        self.metrics = metrics or ServingMetrics()
        self.name = name
        self.engines = engines or EngineSource()
        self.drain_timeout_s = drain_timeout_s
        self._models: dict[tuple[str, str], ServedModel] = {}
        #: model name -> version that requests without a version go to
        self._active: dict[str, str] = {}
        #: model (or bundle) name -> why it is not served (last failed load); cleared by a successful swap
        self.failed: dict[str, str] = {}
        #: models asked for at start-up that did not load (`record_failure`): ready 503, metadata the reason
        self._failed_models: dict[tuple[str, str], FailedModel] = {}
        #: switches done per model name (the metrics show them as outpost_model_switches)
        self.switches: dict[str, int] = {}
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._draining = False
        self._live = True
        self._retiring: set[asyncio.Task[None]] = set()
        self.metrics.track_switches(self._switch_samples)

    # ------------------------------------------------------------------ preparing and switching

    def prepare(self, bundle: VerifiedBundle, config: ModelConfig | None = None,
                engines: EngineSource | None = None) -> PreparedVersion:
        """Build (or fetch from cache) and load every model of a bundle; blocking, run it off the loop.

        Touches nothing that requests read: the result serves nothing until `swap`.
        """
        config = config or ModelConfig()
        source = engines or self.engines
        loaded: list[ServedModel] = []
        try:
            for entry, name in served_names(bundle.manifest):
                loaded.append(self._load_model(bundle, entry.name, name, config, source))
        except BaseException:
            for sm in loaded:
                sm.runner.close()
            raise
        return PreparedVersion(bundle, tuple(loaded))

    def _load_model(self, bundle: VerifiedBundle, entry: str, name: str, config: ModelConfig,
                    source: EngineSource) -> ServedModel:
        manifest = bundle.manifest
        batching = manifest.serving.batching
        max_batch = config.max_batch_size if config.max_batch_size is not None else batching.max_batch_size
        delay_ms = config.max_queue_delay_ms if config.max_queue_delay_ms is not None else batching.max_queue_delay_ms
        runner = Runner.open(bundle, entry, instances=config.instances, threads=config.threads,
                             options=config.engine_options, backend=config.backend, source=source,
                             inline_compute_ms=config.inline_compute_ms)
        log.info("%s: %s", name, runner.placement.describe())
        if config.max_batch_size is None:  # the bundle's guess, capped at what this engine showed pays
            worthwhile = batch_scaling.worthwhile_batch(runner.batch_scaling, max_batch)
            if worthwhile < max_batch:
                log.info("%s: batches of at most %d (the bundle says %d; this engine's time per item: %s)", name,
                         worthwhile, max_batch, _scaling_text(runner.batch_scaling))
        else:
            worthwhile = max_batch
        m = self.metrics.new_model(name, manifest.version, runner.backend)
        batcher = AdaptiveBatcher(
            runner, max_batch_size=worthwhile, max_queue_delay_ms=delay_ms, max_queue=config.max_queue,
            batchable=batch_dim(runner.inputs, runner.outputs) is not None,
            max_request_items=config.max_request_items or 8 * max(1, max_batch), on_batch=m.observe_batch,
        )
        m.track_queue(lambda: batcher.queue_depth)
        validator = Validator(name, runner.inputs, runner.outputs, config.allow_non_finite_inputs)
        return ServedModel(name, manifest.version, manifest.release, bundle, config, runner, batcher, validator, m,
                           batcher.max_batch_size, delay_ms)

    async def swap(self, prepared: PreparedVersion, *, keep_previous: bool = False) -> list[ServedModel]:
        """Route each of the prepared models' names to it, at once; drain and close what it replaces.

        On the event loop, no await between the table writes: a request sees the
        old table or the new one. Returns the versions replaced (closed once
        drained, in the background, unless `keep_previous`).
        """
        replaced: list[ServedModel] = []
        for sm in prepared.models:
            key = (sm.name, sm.version)
            existing = self._models.get(key)
            if existing is not None:  # the same version is loaded already: keep it, drop the duplicate
                self._retire_later(sm, register=False)
                sm = existing
            else:
                self._models[key] = sm
                self.metrics.add(sm.metrics)
            old_version = self._active.get(sm.name)
            self._active[sm.name] = sm.version
            self.failed.pop(sm.name, None)
            self._failed_models.pop((sm.name, sm.version), None)
            if old_version is not None and old_version != sm.version:
                self.switches[sm.name] = self.switches.get(sm.name, 0) + 1
                old = self._models.get((sm.name, old_version))
                if old is not None:
                    replaced.append(old)
        self.failed.pop(prepared.bundle.manifest.name, None)
        if not keep_previous:
            for old in replaced:
                self._models.pop((old.name, old.version), None)
                self._retire_later(old)
        return replaced

    def activate(self, model: str, version: str) -> None:
        """Point requests without a version at another loaded version (last-known-good, instantly)."""
        if (model, version) not in self._models:
            raise ModelNotFound(model, version)
        if self._active.get(model) != version:
            self.switches[model] = self.switches.get(model, 0) + 1
        self._active[model] = version

    def active_version(self, model: str) -> str | None:
        return self._active.get(model)

    def mark_failed(self, name: str, reason: str) -> None:
        """Record why a model (or bundle) is not served; the one already serving, if any, goes on."""
        self.failed[name] = reason

    def record_failure(self, bundle: VerifiedBundle, error: BaseException) -> list[FailedModel]:
        """Remember that a bundle's models did not load, and why: ready says 503, metadata gives the reason."""
        reason = str(error) or type(error).__name__
        failed = [FailedModel(name, bundle.manifest.version, bundle, entry, reason)
                  for entry, name in served_names(bundle.manifest)
                  if (name, bundle.manifest.version) not in self._models]
        for f in failed:
            self._failed_models[(f.name, f.version)] = f
            self.failed[f.name] = reason
        self.failed[bundle.manifest.name] = reason  # the daemon reports by bundle name
        return failed

    def failed_models(self) -> list[FailedModel]:
        return list(self._failed_models.values())

    def _failed_model(self, model: str, version: str | None) -> FailedModel | None:
        if version:
            return self._failed_models.get((model, version))
        return next((f for (n, _), f in self._failed_models.items() if n == model), None)

    def load_bundle(self, bundle: VerifiedBundle, config: ModelConfig | None = None,
                    engines: EngineSource | None = None) -> list[ServedModel]:
        """Prepare and route at once, before serving starts (tests, start-up). Raises if a version is loaded.

        Not for a running server: it writes the table from the calling thread.
        Use `prepare` + `swap` there.
        """
        for _, name in served_names(bundle.manifest):
            if (name, bundle.manifest.version) in self._models:
                raise AgentError(f"model {name!r} version {bundle.manifest.version!r} is already loaded")
        prepared = self.prepare(bundle, config, engines)
        for sm in prepared.models:
            self._models[(sm.name, sm.version)] = sm
            self.metrics.add(sm.metrics)
            current = self._models.get((sm.name, self._active.get(sm.name, "")))
            if current is None or sm.release >= current.release:
                self._active[sm.name] = sm.version
            self.failed.pop(sm.name, None)
            self._failed_models.pop((sm.name, sm.version), None)
        return list(prepared.models)

    def _retire_later(self, sm: ServedModel, register: bool = True) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(sm, register))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, sm: ServedModel, registered: bool = True) -> None:
        """Wait for the requests inside a version to finish, then close it (queued ones are served)."""
        await sm.drained(self.drain_timeout_s)
        await sm.batcher.close()
        await asyncio.to_thread(sm.runner.close)
        if registered:
            self.metrics.remove(sm.metrics)

    async def settle(self) -> None:
        """Wait until every replaced version is drained and closed (tests, shutdown, GC)."""
        while self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    async def unload(self, model: str, version: str) -> None:
        """Stop routing to a version, let its queued and running requests finish, then close it."""
        sm = self._models.pop((model, version), None)
        if sm is None:
            raise ModelNotFound(model, version)
        if self._active.get(model) == version:
            others = [v for (n, v) in self._models if n == model]
            if others:
                self._active[model] = max(others, key=lambda v: self._models[(model, v)].release)
            else:
                del self._active[model]
        await self._retire(sm)

    def get(self, model: str, version: str | None = None) -> ServedModel:
        if version:
            sm = self._models.get((model, version))
            if sm is None:
                raise ModelNotFound(model, version)
            return sm
        active = self._active.get(model)
        sm = self._models.get((model, active)) if active is not None else None
        if sm is None:
            raise ModelNotFound(model)
        return sm

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def active_models(self) -> list[ServedModel]:
        return [self._models[(n, v)] for n, v in self._active.items() if (n, v) in self._models]

    def _switch_samples(self) -> list[tuple[str, str, int]]:
        return [(n, self._active.get(n, ""), c) for n, c in self.switches.items()]

    # ------------------------------------------------------------------ inference

    async def infer(self, model: str, version: str | None, request: InferRequest,
                    deadline: float | None = None) -> InferResponse:
        """Validate, queue, batch, run and answer one request; raises AgentError subclasses."""
        if self._draining:
            raise Unavailable("server is shutting down; not taking new requests")
        sm = self.get(model, version)
        t0 = time.monotonic()
        if deadline is None:
            deadline = t0 + sm.config.timeout_ms / 1000.0
        m = sm.metrics
        self._in_flight += 1
        m.in_flight += 1
        sm.active_requests += 1  # sm.enter(), inline: this runs per request
        try:
            feeds = sm.validator.feeds(request)
            result = await sm.batcher.submit(feeds, deadline)
            outputs = result.outputs
            response = build_response(request, sm.name, sm.version, outputs)
            m.non_finite += count_non_finite(outputs.values())
            now = time.monotonic()
            m.observe_success(result.queue_s, result.compute_s, now - t0, now)
            return response
        except AgentError as e:
            m.observe_failure(type(e).__name__)
            raise
        except asyncio.CancelledError:
            m.observe_failure("Cancelled")
            raise
        finally:
            sm.leave()
            m.in_flight -= 1
            self._in_flight -= 1
            if self._in_flight == 0 and self._idle is not None:
                self._idle.set()

    # ------------------------------------------------------------------ health and metadata

    def server_live(self) -> bool:
        return self._live

    def server_ready(self) -> bool:
        return self._live and not self._draining and bool(self._models)

    def model_ready(self, model: str, version: str | None = None) -> bool:
        """Raises ModelNotFound for a model nobody asked for (a 404); one that failed to load is not ready."""
        try:
            self.get(model, version)
        except ModelNotFound:
            if self._failed_model(model, version) is not None:
                return False
            raise
        return not self._draining

    def server_metadata(self) -> dict[str, Any]:
        return {"name": self.name, "version": _version(), "extensions": list(EXTENSIONS)}

    def model_metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        try:
            sm = self.get(model, version)
        except ModelNotFound:
            failed = self._failed_model(model, version)
            if failed is not None:
                return failed.metadata()
            raise
        versions = [v for (n, v) in self._models if n == sm.name]
        return sm.metadata(versions)

    def tail_latency(self) -> Mapping[tuple[str, str], TailLatency]:
        """p50/p95/p99 per model version over the metrics window (the fleet report reads this)."""
        return {key: sm.metrics.tail.snapshot() for key, sm in self._models.items()}

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def draining(self) -> bool:
        return self._draining

    # ------------------------------------------------------------------ shutdown

    def begin_drain(self) -> None:
        """Stop taking requests (not ready, new ones get 503); in-flight ones go on."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait for in-flight requests to finish; False if some were still running at the timeout."""
        if self._in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            async with timeout(timeout_s):
                await self._idle.wait()
        except asyncio.TimeoutError:
            return self._in_flight == 0
        return True

    async def close(self) -> None:
        self.begin_drain()
        self._live = False
        await self.settle()
        for key in list(self._models):
            await self.unload(*key)
