"""A TCP relay that delays every byte by a fixed time in each direction (a WAN stand-in).

This kernel has no netem, so latency is added in user space: each chunk read from one side is
written to the other side ``delay_s`` after it arrived, in order. Chunks are pipelined (a later
chunk does not wait for an earlier one's delay to end), so the relay adds latency, not a
bandwidth limit: a round trip through it costs ``2 * delay_s`` more, as on a long link.

``Relay`` runs its own event loop on a daemon thread: ``with Relay(port) as relay:`` then connect
to ``relay.port`` on 127.0.0.1 instead of ``port``. ``round_trips`` counts, over every
connection, the times the server answered after the client had sent: what each would cost on a
real link (connecting, authenticating and every query not pipelined with another).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from contextlib import suppress

CHUNK = 256 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay_s: float, on_data: Callable[[], None]) -> None:
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
            on_data()
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
        self.round_trips = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"relay-{port}", daemon=True)
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        # Both pumps run on this loop's thread: no lock needed.
        awaiting = False

        def sent() -> None:
            nonlocal awaiting
            awaiting = True

        def answered() -> None:
            nonlocal awaiting
            if awaiting:
                awaiting = False
                self.round_trips += 1

        await asyncio.gather(_pump(reader, up_writer, self.delay_s, sent),
                             _pump(up_reader, writer, self.delay_s, answered),
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

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
