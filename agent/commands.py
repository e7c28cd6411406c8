"""`outpost serve`: the data plane standalone, no fleet needed.

With `--trust` each bundle is verified and the command refuses to start if any
fails verification (a tampered bundle is an incident, not a partial start). A
verified bundle whose engine does not load is reported (log, `ready` 503, the
reason in its metadata) and the others are served; the command fails only when
no model loads. Without it, bundles are loaded unverified for the developer loop and
the command says so loudly, once per bundle. The agent daemon reuses `serve()`
with verified bundles only, through its `Lifecycle` hooks; a bundle that
fails to load is recorded (`DataPlane.failed`) and the others still serve.

Other transports plug in without touching this command's body: a `Transport`
is a callable that takes the running DataPlane and returns an async context
manager (started after HTTP, stopped before it); add its click options to
`serve_command` and append it to `transports` from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import click

import bundle
from engines import EngineOptions
from runtime import LoopUnavailable, run_loop, stop_on_signals
from runtime.sdnotify import Notifier

from .config import AUTO, ModelConfig, ServerConfig, instances_setting, threads_setting
from .dataplane import DataPlane
from .errors import ConfigError
from .http_server import HttpServer
from .instances import Placement
from .mqtt.commands import mqtt_options

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Start-up time systemd grants per bundle load on top of TimeoutStartSec (EXTEND_TIMEOUT_USEC).
LOAD_ALLOWANCE_S = 600.0
Transport = Callable[[DataPlane], AbstractAsyncContextManager[Any]]


def load_bundles(dirs: Sequence[str], trust: Sequence[str]) -> list[bundle.VerifiedBundle]:
    if trust:
        anchors = bundle.anchors(list(trust))
        # The signature step runs in a child process: the OMS stack never stays resident here.
        return [bundle.verify(d, anchors, isolate_signature=True) for d in dirs]
    loaded = []
    for d in dirs:
        vb = bundle.load_unverified(d)
        click.secho(f"WARNING: serving {vb.manifest.ref} from {d} UNVERIFIED (no --trust given): "
                    "its signature was not checked. Never do this in production.", fg="red", bold=True, err=True)
        loaded.append(vb)
    return loaded


@dataclass
class Lifecycle:
    """What the embedding program does at each stage of serving; every hook is optional.

    `outpost serve` prints, the daemon starts its sync coordinator, systemd
    notification sends READY=1 / STOPPING=1: all through these, none inside
    `serve()`. Hooks may be plain functions or coroutines.
    """

    #: after the bundles are loaded and every transport listens: (dataplane, server, seconds since start)
    on_ready: Callable[[DataPlane, HttpServer, float], Any] | None = None
    #: the stop event fired; new requests are refused from here on
    on_stopping: Callable[[], Any] | None = None
    #: the server is closed; True if every in-flight request finished
    on_stopped: Callable[[bool], Any] | None = None
    #: a bundle failed to load at start: (its ref, the error); the others still serve
    on_load_failed: Callable[[str, BaseException], Any] | None = None


async def _call(hook: Callable[..., Any] | None, *args: Any) -> None:
    if hook is not None:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result


async def load_each(dataplane: DataPlane, bundles: Sequence[bundle.VerifiedBundle], model_config: ModelConfig,
                    lifecycle: Lifecycle, notifier: Notifier | None = None) -> None:
    """Load every bundle independently: one that fails is recorded and reported; the others serve."""
    for vb in bundles:
        if notifier is not None:
            # An engine build (TensorRT) can outlast TimeoutStartSec: each model gets its own allowance.
            notifier.extend_timeout(LOAD_ALLOWANCE_S, f"loading {vb.manifest.ref}")
        try:
            prepared = await asyncio.to_thread(dataplane.prepare, vb, model_config)
        except Exception as e:
            for f in dataplane.record_failure(vb, e):
                log.error("model %s@%s did not load: %s", f.name, f.version, f.reason)
            await _call(lifecycle.on_load_failed, vb.manifest.ref, e)
            continue
        await dataplane.swap(prepared)


class NothingLoaded(click.ClickException):
    """`outpost serve` was given bundles and not one of them loaded: nothing to serve."""

    def __init__(self) -> None:
        super().__init__("no model could be loaded; see the errors above")


async def serve(bundles: Sequence[bundle.VerifiedBundle], model_config: ModelConfig, server_config: ServerConfig,
                transports: Sequence[Transport] = (), *, stop: asyncio.Event, lifecycle: Lifecycle | None = None,
                dataplane: DataPlane | None = None, started_at: float | None = None, require_models: bool = False,
                watchdog_checks: Sequence[Callable[[], str | None]] = ()) -> bool:
    """Load, serve until `stop` is set, drain. Returns True if every in-flight request finished.

    Installs no signal handler and prints nothing: the caller decides both
    (`runtime.stop_on_signals(stop)`, `lifecycle`). `transports` start after
    HTTP and stop before it, in reverse order; the daemon's sync coordinator is one.
    Under systemd (`NOTIFY_SOCKET`) it says READY=1 once the loaded models serve,
    pings the watchdog while the loop, the data plane and `watchdog_checks` are
    healthy, and says STOPPING=1 when the drain begins. `require_models`: raise
    `NothingLoaded` when bundles were given and none loaded (`outpost serve`; the
    daemon may start with nothing installed).
    """
    lifecycle = lifecycle or Lifecycle()
    started_at = time.monotonic() if started_at is None else started_at
    dataplane = dataplane or DataPlane(drain_timeout_s=server_config.drain_timeout_s)
    notifier = Notifier.from_env()  # systemd Type=notify; a no-op elsewhere
    try:
        await load_each(dataplane, bundles, model_config, lifecycle, notifier)
        if require_models and bundles and not dataplane.active_models():
            raise NothingLoaded()
        # Start-up leaves a large heap of long-lived objects (model-signing, schema, runtime bindings):
        # freeze them so the collector's full passes under load skip what will never be garbage.
        gc.collect()
        gc.freeze()
        server = HttpServer(dataplane, server_config)
        await server.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                for transport in transports:
                    await stack.enter_async_context(transport(dataplane))
                await _call(lifecycle.on_ready, dataplane, server, time.monotonic() - started_at)
                served = [f"{sm.name}@{sm.version}" for sm in dataplane.active_models()]
                notifier.ready(f"serving {len(served)} model(s) on {server.url}: {', '.join(served) or 'none'}")
                await stack.enter_async_context(notifier.watchdog([_live_check(dataplane), *watchdog_checks]))
                await stop.wait()
                await _call(lifecycle.on_stopping)
                dataplane.begin_drain()
                notifier.stopping(f"draining {dataplane.in_flight} in-flight request(s)")
        finally:
            drained = await server.stop()
    finally:
        notifier.close()
    await _call(lifecycle.on_stopped, drained)
    return drained


def _live_check(dataplane: DataPlane) -> Callable[[], str | None]:
    """The watchdog's self-check for a data plane: it must still be live."""
    return lambda: None if dataplane.server_live() else "data plane is no longer live"


def console_lifecycle(prog: str = "outpost serve") -> Lifecycle:
    """The lines `outpost serve` prints on stderr at each stage."""

    def ready(dataplane: DataPlane, server: HttpServer, took_s: float) -> None:
        names = ", ".join(f"{sm.name}@{sm.version} ({sm.runner.backend}, {_instances(sm.runner.placement)}, "
                          f"batch {sm.max_batch_size})"
                          for sm in dataplane.active_models()) or "none"
        click.echo(f"{prog}: ready on {server.url} in {took_s:.2f} s; models: {names}", err=True)
        for sm in dataplane.active_models():
            if sm.runner.parity_note:
                click.secho(f"{prog}: {sm.name}@{sm.version} parity {sm.runner.parity_note}", fg="yellow", err=True)
        for name, reason in dataplane.failed.items():
            click.secho(f"{prog}: {name} is NOT served: {reason}", fg="red", err=True)

    def stopped(drained: bool) -> None:
        click.echo(f"{prog}: stopped{'' if drained else ' (some requests were cut off)'}", err=True)

    def load_failed(ref: str, error: BaseException) -> None:
        click.secho(f"{prog}: NOT serving {ref}: {error}", fg="red", err=True)

    return Lifecycle(on_ready=ready, on_stopping=lambda: click.echo(
        f"{prog}: stopping (draining in-flight requests)", err=True), on_stopped=stopped, on_load_failed=load_failed)


def _instances(p: Placement) -> str:
    """'2x1 threads' for the ready line; the reason is in the model's metadata and the load log."""
    return f"{p.instances}x{p.threads or 'default'} threads"


def _auto_setting(parse: Callable[[object], int | None]) -> Callable[[click.Context, click.Parameter, str], int | None]:
    """A click callback: "auto" or a number, parsed by the same function as the daemon's TOML key."""

    def convert(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
        try:
            return parse(value)
        except ConfigError as e:
            raise click.BadParameter(str(e), ctx, param) from None

    return convert


@click.command("serve")
@click.argument("bundle_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address; loopback by default.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--trust", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Public key to verify bundles with (repeatable). Without it, bundles are served UNVERIFIED.")
@click.option("--token", envvar="OUTPOST_TOKEN", help="Require 'Authorization: Bearer TOKEN' (env OUTPOST_TOKEN).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="TLS certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="TLS private key (PEM).")
@click.option("--instances", default=AUTO, show_default=True, metavar="auto|N",
              callback=_auto_setting(instances_setting),
              help="Engine instances per model (batches computing at once); auto or 0: per model at load "
                   "(2 for a compute-bound model on a multi-core CPU, else 1).")
@click.option("--threads", default=AUTO, show_default=True, metavar="auto|N",
              callback=_auto_setting(threads_setting),
              help="Intra-op threads per instance (0: one per core); auto: the cores split between the instances.")
@click.option("--spin/--no-spin", default=False, show_default=True,
              help="Let ORT threads spin between calls: faster on tiny models, burns idle cores.")
@click.option("--max-batch-size", type=click.IntRange(1, 4096), help="Override the manifest's max_batch_size.")
@click.option("--max-queue-delay-ms", type=click.FloatRange(0, 10_000), help="Override the manifest's batching window.")
@click.option("--max-queue", default=128, show_default=True, type=click.IntRange(1, 1_000_000),
              help="Waiting requests per model before 503 + Retry-After.")
@click.option("--timeout-ms", default=30_000.0, show_default=True, type=click.FloatRange(1, 3_600_000),
              help="Default (and longest) deadline of a request; past it, 504.")
@click.option("--max-body-bytes", default=64 << 20, show_default=True, type=click.IntRange(1024),
              help="Larger request bodies get 413 before they are read.")
@click.option("--body-budget-wait-s", default=5.0, show_default=True, type=click.FloatRange(0, 3600),
              help="A body that does not fit the budget of bodies in memory (2 x --max-body-bytes) waits this long "
                   "for room, first come first served (never past its deadline), then gets 503 (0: at once).")
@click.option("--allow-non-finite", is_flag=True, help="Accept NaN/Inf in float inputs.")
@click.option("--inline-compute-ms", default=0.2, show_default=True, type=click.FloatRange(0, 1000),
              help="Run batches whose engine time stays below this on the event loop (0: always threads).")
@click.option("--drain-timeout-s", default=20.0, show_default=True, type=click.FloatRange(0, 3600))
@click.option("--loop", "loop_name", type=click.Choice(["auto", "asyncio", "uvloop"]), default="auto",
              show_default=True, help="Event loop: auto uses uvloop where installed.")
@click.option("--shared-memory", is_flag=True,
              help="Accept tensors in POSIX shared memory (Triton's system shared-memory extension; local clients).")
@mqtt_options
def serve_command(bundle_dirs: tuple[str, ...], host: str, port: int, trust: tuple[str, ...], token: str | None,
                  tls_cert: str | None, tls_key: str | None, instances: int | None, threads: int | None, spin: bool,
                  max_batch_size: int | None, max_queue_delay_ms: float | None, max_queue: int,
                  timeout_ms: float, max_body_bytes: int, body_budget_wait_s: float, allow_non_finite: bool,
                  inline_compute_ms: float,
                  drain_timeout_s: float, loop_name: str, shared_memory: bool = False,
                  mqtt_transport: Transport | None = None) -> None:
    """Serve BUNDLE_DIR... over the Open Inference Protocol (KServe v2) on HTTP, and on MQTT with --mqtt."""
    started = time.monotonic()
    bundles = load_bundles(bundle_dirs, trust)
    model_config = ModelConfig(
        instances=instances, threads=threads, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
        max_queue=max_queue, timeout_ms=timeout_ms, allow_non_finite_inputs=allow_non_finite,
        inline_compute_ms=inline_compute_ms, engine_options=EngineOptions(allow_spinning=spin),
    )
    server_config = ServerConfig(host=host, port=port, token=token, tls_cert=tls_cert, tls_key=tls_key,
                                 max_body_bytes=max_body_bytes, body_budget_wait_s=body_budget_wait_s,
                                 drain_timeout_s=drain_timeout_s,
                                 shared_memory=shared_memory)
    if host not in ("127.0.0.1", "::1", "localhost") and not token:
        click.secho(f"WARNING: listening on {host} without --token: anyone who can reach it can use it.",
                    fg="yellow", err=True)
    transports: list[Transport] = []
    if mqtt_transport is not None:
        transports.append(mqtt_transport)
    async def main() -> bool:
        stop = asyncio.Event()
        stop_on_signals(stop)
        return await serve(bundles, model_config, server_config, transports, stop=stop,
                           lifecycle=console_lifecycle(), started_at=started, require_models=True)

    run_command_loop(main(), loop_name)


def run_command_loop(main: Coroutine[Any, Any, T], loop_name: str) -> T:
    """`runtime.run_loop` with a click usage error for an event loop that is not installed."""
    try:
        return run_loop(main, loop_name)
    except LoopUnavailable as e:
        raise click.UsageError(f"--loop {loop_name}: {e}") from None
