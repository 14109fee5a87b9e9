"""A TCP relay that delays every byte by a fixed time in each direction (a WAN stand-in).

This kernel has no netem, so latency is added in user space: each chunk read from one side is
written to the other side ``delay_s`` after it was read, in order. Chunks are pipelined (a later
chunk does not wait for an earlier one's delay to end), so the relay adds latency, not a
bandwidth limit: a round trip through it costs ``2 * delay_s`` more, as on a long link.

A real link carries bytes without taking the hosts' cores, but this relay runs on the same cores
as the consumers it measures. Reading a walsender's stream message by message (each is sent on
its own) cost the relay 0.59 s of CPU while native replication drained 300,000 changes, against
0.05 s for cdcsync's large COPY chunks: the relay took CPU from the very consumer it relayed.
So while bytes keep coming (reads less than :data:`STREAM_GAP_S` apart), each direction reads at
most once per :data:`TICK_S` and takes what gathered in the socket meanwhile: a streamed byte
takes up to ``TICK_S`` more, while a query sent after a pause, and its answer, are read at once
(their round trip costs what it should).
:meth:`Relay.cpu_s` tells what the relay itself used.

:meth:`Relay.stall` stops it relaying, in both directions and on every connection, until
:meth:`Relay.resume`: a link that stalls for a while, its connections kept. Nothing is lost; the
bytes wait in the relay and in the sockets, and their senders block once those are full.
:meth:`Relay.freeze` stops relaying on the connections open at the time, for good, while new
ones are relayed as before: a middlebox that lost track of its connections but keeps them open
(its kernel acknowledging every packet and keepalive).

``Relay`` runs its own event loop on a daemon thread: ``with Relay(port) as relay:`` then connect
to ``relay.port`` on 127.0.0.1 instead of ``port``. ``python -m bench.relay PORT [--delay-ms 10]``
runs one in a process of its own (its port on the first line of its output, until its standard
input closes): a relay sharing a busy process's interpreter is slowed by it, which lengthens the
round trips it stands for.

Each connection counts its *waits* (:attr:`Link.waits`): the bursts of bytes the client sends after
the server last spoke. A client that sends a query and waits for the answer before sending more
pays one per query; one that sends several queries or a COPY's data without waiting pays one in
all. Across a WAN each wait costs a round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from bench.cpu import TICKS

CHUNK = 256 * 1024
# How often a direction that keeps receiving is read (see the module docstring), and the gap
# between two reads under which it counts as receiving a stream.
TICK_S = 0.001
STREAM_GAP_S = 0.005


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


async def _open(gates: tuple[asyncio.Event, ...]) -> None:
    for gate in gates:
        await gate.wait()


async def _pump(source: socket.socket, sink: socket.socket, delay_s: float,
                seen: Callable[[], None], gates: tuple[asyncio.Event, ...]) -> None:
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
            await _open(gates)
            await loop.sock_sendall(sink, data)

    sender = asyncio.create_task(deliver())
    last = -STREAM_GAP_S
    try:
        while True:
            await _open(gates)
            if not (data := await loop.sock_recv(source, CHUNK)):
                break
            now = loop.time()
            seen()
            queue.put_nowait((now + delay_s, data))
            if len(data) < CHUNK and now - last < STREAM_GAP_S:
                # Bytes keep coming: nothing reads the socket while this sleeps, so they gather
                # in it and the next read takes them all. A full read is not followed by a
                # sleep: more is waiting already.
                await asyncio.sleep(TICK_S)
            last = now
    except OSError:
        pass
    queue.put_nowait((loop.time() + delay_s, b""))
    with suppress(OSError):
        await sender
        sink.shutdown(socket.SHUT_WR)


class Relay:
    """Listens on 127.0.0.1 (a free port) and relays each connection to 127.0.0.1:``port``."""

    def __init__(self, port: int, delay_s: float) -> None:
        self.target_port, self.delay_s = port, delay_s
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"relay-{port}", daemon=True)
        self._listener: socket.socket | None = None
        # Set while the relay relays (see stall); cleared and set on its event loop only, where
        # the pumps wait on it.
        self._flowing = asyncio.Event()
        self._flowing.set()
        # Each open connection's own gate (see freeze).
        self._gates: list[asyncio.Event] = []
        self.links: list[Link] = []

    @property
    def round_trips(self) -> int:
        """The waits of every connection so far: what its clients would pay on a real link."""
        return sum(link.waits for link in self.links)

    def cpu_s(self) -> float:
        """CPU seconds (user plus system) the relay's thread has used so far."""
        stat = Path(f"/proc/self/task/{self._thread.native_id}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def stall(self) -> None:
        """Stop relaying (see the module docstring). Once this returns, nothing more leaves the
        relay but a chunk it was already writing."""
        self._on_loop(self._flowing.clear)

    def resume(self) -> None:
        """Relay again what waited, then the rest, as before :meth:`stall`."""
        self._on_loop(self._flowing.set)

    def freeze(self) -> None:
        """Stop relaying on every connection open now, for as long as the relay runs; new
        connections are relayed."""
        def close_gates() -> None:
            for gate in self._gates:
                gate.clear()
        self._on_loop(close_gates)

    def _on_loop(self, action: Callable[[], None]) -> None:
        async def run() -> None:
            action()
        asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=5)

    async def _handle(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        try:
            await self._loop.sock_connect(upstream, ("127.0.0.1", self.target_port))
        except OSError:
            upstream.close()
            client.close()
            return
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = Link()
        self.links.append(link)
        gate = asyncio.Event()
        gate.set()
        self._gates.append(gate)
        gates = (self._flowing, gate)
        try:
            await asyncio.gather(
                _pump(client, upstream, self.delay_s, link.from_client, gates),
                _pump(upstream, client, self.delay_s, link.from_server, gates),
                return_exceptions=True)
        finally:
            self._gates.remove(gate)
            client.close()
            upstream.close()

    async def _serve(self) -> None:
        assert self._listener is not None
        tasks: set[asyncio.Task[None]] = set()
        while True:
            client, _ = await self._loop.sock_accept(self._listener)
            client.setblocking(False)
            task = asyncio.create_task(self._handle(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._ready.set()
        self._loop.create_task(self._serve())
        self._loop.run_forever()

    def __enter__(self) -> Relay:
        self._thread.start()
        self._ready.wait(10)
        return self

    async def _shutdown(self) -> None:
        if self._listener is not None:
            self._listener.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __exit__(self, *exc: object) -> None:
        with suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description="Relay 127.0.0.1:PORT with an added delay.")
    parser.add_argument("port", type=int)
    parser.add_argument("--delay-ms", type=float, default=10.0, help="added in each direction")
    args = parser.parse_args()
    with Relay(args.port, args.delay_ms / 1000) as relay:
        print(relay.port, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
