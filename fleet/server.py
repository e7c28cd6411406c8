"""Running the fleet: an AppRunner + TCPSite, resources opened and closed in cleanup_ctx.

`outpost fleet serve` calls `serve`; tests and embedders can use `start` to get
a running server on a free port and stop it themselves. On SIGTERM/SIGINT the
server stops taking connections, answers pending long-polls at once, and
closes the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from runtime import stop_on_signals
from runtime.sdnotify import Notifier

from .api import FLEET, build_app
from .config import ServerConfig
from .dashboard import routes as dashboard_routes
from .gcpolicy import full_collections, tune_for_serving
from .rollouts import RolloutEngine
from .rollouts.api import ENGINE
from .rollouts.api import routes as rollout_routes
from .rollouts.nudge import MqttNudger
from .service import Fleet


def make_app(config: ServerConfig) -> web.Application:
    app = build_app()
    app.add_routes(rollout_routes)

    async def _fleet_ctx(app: web.Application) -> AsyncIterator[None]:
        fleet = await Fleet.open(config)
        app[FLEET] = fleet
        rc = config.rollouts
        nudger = MqttNudger(rc.nudge_mqtt_url, rc.nudge_topic) if rc.nudge_mqtt_url else None
        engine = RolloutEngine(fleet.db, fleet.assignments, rc, nudger)
        app[ENGINE] = engine
        task = asyncio.create_task(engine.run(), name="fleet-rollouts")
        try:
            async with fleet.run_background():
                yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if nudger is not None:
                nudger.close()
            await fleet.close()

    async def _on_shutdown(app: web.Application) -> None:
        app[FLEET].notifier.close()

    app.cleanup_ctx.append(_fleet_ctx)
    dashboard_routes.setup(app)  # after the fleet: its context reads the fleet's key directory
    app.on_shutdown.append(_on_shutdown)
    return app


#: how long a stopping fleet waits, no longer listening, for sockets already accepted to get their connections
ACCEPTED_SETTLE_S = 0.02


@dataclass
class Running:
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        """Stop listening, let connections already accepted reach aiohttp, then shut them all down.

        asyncio makes the transport of an accepted socket a task step or two after accepting
        it, and aiohttp's cleanup waits one loop iteration before it lists the connections to
        close: a device connecting at that moment got a connection that outlived the server,
        still answered by its closed app, and was found unclosed when the loop went (a fleet
        restarted under a simulated fleet's load, in CI).
        """
        for site in list(self.runner.sites):
            await site.stop()
        await asyncio.sleep(ACCEPTED_SETTLE_S)
        await self.runner.cleanup()


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """HTTPS when a certificate and key are configured (TLS 1.2+, the stdlib's secure defaults)."""
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    return ctx


async def start(config: ServerConfig) -> Running:
    tls = tls_context(config)
    runner = web.AppRunner(make_app(config), access_log=None, shutdown_timeout=5.0,
                           handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=4096, ssl_context=tls)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    return Running(runner, f"{'https' if tls else 'http'}://{shown}:{port}")


async def serve(config: ServerConfig) -> None:
    running = await start(config)
    tune_for_serving()
    collector = asyncio.create_task(full_collections(), name="fleet-full-gc")
    # Database drivers run in threads (aiosqlite) that need the GIL back from the busy event
    # loop for every statement; the default 5 ms hand-over made each statement of a report's
    # transaction cost up to 5 ms under load. 0.5 ms keeps them short at little cost.
    sys.setswitchinterval(0.0005)
    print(f"fleet: listening on {running.url}", flush=True)
    stop = asyncio.Event()
    stop_on_signals(stop)
    notifier = Notifier.from_env()  # systemd Type=notify; a no-op elsewhere
    notifier.ready(f"serving on {running.url}")
    try:
        async with notifier.watchdog():
            await stop.wait()
    finally:
        notifier.stopping("closing connections and the database")
        collector.cancel()
        await running.stop()
        notifier.close()
        print("fleet: stopped", file=sys.stderr, flush=True)
