"""A TCP relay that delays every byte by a fixed time in each direction (a WAN stand-in).

This kernel has no netem, so latency is added in user space: each chunk read from one side is
written to the other side ``delay_s`` after it arrived, in order. Chunks are pipelined (a later
chunk does not wait for an earlier one's delay to end), so the relay adds latency, not a
bandwidth limit: a round trip through it costs ``2 * delay_s`` more, as on a long link.

``Relay`` runs its own event loop on a daemon thread: ``with Relay(port) as relay:`` then connect
to ``relay.port`` on 127.0.0.1 instead of ``port``.

Each connection counts its *waits* (:attr:`Link.waits`): the bursts of bytes the client sends after
the server last spoke. A client that sends a query and waits for the answer before sending more
pays one per query; one that sends several queries or a COPY's data without waiting pays one in
all. Across a WAN each wait costs a round trip.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

CHUNK = 256 * 1024


@dataclass
class Link:
    """One relayed connection: how many times its client spoke after the server answered."""

    waits: int = 0
    # When each wait began (time.monotonic()).
    times: list[float] = field(default_factory=list)
    _answered: bool = True

    def from_client(self) -> None:
        if self._answered:
            self.waits += 1
            self.times.append(time.monotonic())
            self._answered = False

    def waits_between(self, start: float, end: float) -> int:
        return sum(start <= t <= end for t in self.times)

    def from_server(self) -> None:
        self._answered = True


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay_s: float, seen: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            seen()
            queue.put_nowait((loop.time() + delay_s, data))
    except OSError:
        pass
    queue.put_nowait((loop.time() + delay_s, b""))
    with suppress(OSError):
        await sender
    writer.close()


class Relay:
    """Listens on 127.0.0.1 (a free port) and relays each connection to 127.0.0.1:``port``."""

    def __init__(self, port: int, delay_s: float) -> None:
        self.target_port, self.delay_s = port, delay_s
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"relay-{port}", daemon=True)
        self._server: asyncio.Server | None = None
        self.links: list[Link] = []

    @property
    def round_trips(self) -> int:
        """The waits of every connection so far: what its clients would pay on a real link."""
        return sum(link.waits for link in self.links)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        link = Link()
        self.links.append(link)
        await asyncio.gather(_pump(reader, up_writer, self.delay_s, link.from_client),
                             _pump(up_reader, writer, self.delay_s, link.from_server),
                             return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> Relay:
        self._thread.start()
        self._ready.wait(10)
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __exit__(self, *exc: object) -> None:
        with suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
