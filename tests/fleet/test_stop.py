"""A stopping fleet closes every connection it accepted, even one accepted as it stopped."""

from __future__ import annotations

import asyncio
import pathlib
import urllib.parse

from fleet.server import start

from .conftest import server_config


async def test_connections_accepted_while_stopping_are_closed_with_the_server(
        db_url: str, tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    """Devices keep connecting while the fleet stops (a restart under load). Each connection that got
    through must be closed by the stop; before, one accepted at that moment stayed open, answered by
    the stopped app, until the event loop went and it was found unclosed."""
    running = await start(server_config(tmp_path / "data", db_url, keypair[1]))
    url = urllib.parse.urlsplit(running.url)
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    stopping = asyncio.Event()

    async def connect_until_refused() -> None:
        while True:
            try:
                opened.append(await asyncio.open_connection(url.hostname, url.port))
            except OSError:
                if stopping.is_set():
                    return
            await asyncio.sleep(0)

    herd = [asyncio.create_task(connect_until_refused()) for _ in range(8)]
    try:
        while len(opened) < 40:
            await asyncio.sleep(0.001)
        stopping.set()
        await running.stop()
        await asyncio.wait_for(asyncio.gather(*herd), 10)
        assert len(opened) >= 40
        for i, (reader, _) in enumerate(opened):
            # EOF (or a reset) soon after the stop: nothing is left open on the server's side
            assert await asyncio.wait_for(reader.read(1), 5) == b"", i
    finally:
        for task in herd:
            task.cancel()
        for _, writer in opened:
            writer.close()
