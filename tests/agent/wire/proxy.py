"""A loopback TCP proxy that counts what the fleet sends and can cut the connection mid-stream.

Used to interrupt a real download the way a network does (the socket just
closes), and to measure how many bytes crossed the wire on each connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class Proxy:
    upstream_host: str
    upstream_port: int
    #: Connection index (0 = first opened) -> cut it once it has carried this many bytes downstream.
    cuts: dict[int, int] = field(default_factory=dict)
    #: Bytes sent downstream, per connection, in order of opening.
    downstream: list[int] = field(default_factory=list)
    url: str = ""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.downstream)
        self.downstream.append(0)
        up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)

        async def pump_up() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    up_writer.write(data)
                    await up_writer.drain()

        async def pump_down() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await up_reader.read(65536):
                    limit = self.cuts.get(index)
                    if limit is not None and self.downstream[index] + len(data) >= limit:
                        data = data[:max(0, limit - self.downstream[index])]
                        writer.write(data)
                        self.downstream[index] += len(data)
                        await writer.drain()
                        return
                    writer.write(data)
                    self.downstream[index] += len(data)
                    await writer.drain()

        tasks = [asyncio.create_task(pump_up()), asyncio.create_task(pump_down())]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
            for w in (writer, up_writer):
                w.transport.abort()  # a hard close, as a dropped link looks to the client
