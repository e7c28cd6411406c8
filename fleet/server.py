"""Running the fleet: an AppRunner + TCPSite, resources opened and closed in cleanup_ctx.

`outpost fleet serve` calls `serve`; tests and embedders can use `start` to get
a running server on a free port and stop it themselves. On SIGTERM/SIGINT the
server stops taking connections, answers pending long-polls at once, and
closes the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from .api import FLEET, build_app
from .config import ServerConfig
from .gcpolicy import full_collections, tune_for_serving
from .service import Fleet


def make_app(config: ServerConfig) -> web.Application:
    app = build_app()

    async def _fleet_ctx(app: web.Application) -> AsyncIterator[None]:
        fleet = await Fleet.open(config)
        app[FLEET] = fleet
        try:
            async with fleet.run_background():
                yield
        finally:
            await fleet.close()

    async def _on_shutdown(app: web.Application) -> None:
        app[FLEET].notifier.close()

    app.cleanup_ctx.append(_fleet_ctx)
    app.on_shutdown.append(_on_shutdown)
    return app


@dataclass
class Running:
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start(config: ServerConfig) -> Running:
    runner = web.AppRunner(make_app(config), access_log=None, shutdown_timeout=5.0,
                           handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=4096)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    return Running(runner, f"http://{shown}:{port}")


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
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        collector.cancel()
        await running.stop()
        print("fleet: stopped", file=sys.stderr, flush=True)
