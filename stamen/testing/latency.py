"""Latency emulated at the transport: a TCP relay that holds every byte for a set one-way delay.

This machine's kernel has no ``netem`` (nor ``fq``/``etf``, which could delay packets by their
departure time), so benchmarks and tests put a relay in front of each server's listening port and
make the server announce the relay's address: every libp2p connection to that server (from the
client or from another server) then crosses exactly one relay, and each chunk of bytes read from
either side is written to the other side ``delay`` seconds after it arrived. Both directions are
delayed, so a connection's round trip grows by ``2 × delay``.

What this is and is not: it delays the bytes of each TCP stream (libp2p's handshakes, multiplexer
frames and every RPC message, in order, pipelined: a stream of many messages is not serialised by
the delay); it does not delay the kernel's TCP acknowledgements between the relay and either end,
so TCP congestion and receive windows open as on a short link (no slow start over a long round
trip). Label results "latency emulated at the transport, not by the kernel".

The delay may be changed while connections are open (``Relay.delay``, or a new number of
milliseconds on the relay process's stdin); the process exits when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import socket
import sys
import threading
import time

CHUNK = 256 * 1024
MAX_BUFFERED = 32 * 1024 * 1024
"""Bytes a direction may hold before the relay stops reading from its source (back-pressure)."""


class _Pipe:
    """One direction of one connection: bytes read now are written ``delay`` seconds later, in order."""

    def __init__(self, relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.relay, self.reader, self.writer = relay, reader, writer
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.buffered = 0
        self.has_data = asyncio.Event()
        self.has_room = asyncio.Event()
        self.has_room.set()
        self.eof = False

    async def read_loop(self) -> None:
        try:
            while True:
                await self.has_room.wait()
                data = await self.reader.read(CHUNK)
                if not data:
                    break
                self.queue.append((time.monotonic() + self.relay.delay, data))
                self.buffered += len(data)
                if self.buffered > MAX_BUFFERED:
                    self.has_room.clear()
                self.has_data.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof = True
            self.has_data.set()

    async def write_loop(self) -> None:
        try:
            while True:
                if not self.queue:
                    if self.eof:
                        break
                    self.has_data.clear()
                    await self.has_data.wait()
                    continue
                due, data = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.queue.popleft()
                self.buffered -= len(data)
                if self.buffered <= MAX_BUFFERED:
                    self.has_room.set()
                self.writer.write(data)
                await self.writer.drain()
            if self.writer.can_write_eof():
                self.writer.write_eof()
        except (ConnectionError, OSError):
            pass


class Relay:
    """Listens on ``listen`` and forwards every connection to ``target``, ``delay`` seconds each way."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay: float = 0.0):
        self.listen, self.target, self.delay = listen, target, delay
        self.server: asyncio.Server | None = None
        self.connections = 0

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, *self.listen, limit=CHUNK)
        self.listen = self.server.sockets[0].getsockname()[:2]
        return self.listen

    async def _handle(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target, limit=CHUNK)
        except OSError:
            down_writer.close()
            return
        self.connections += 1
        for w in (down_writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle wait on top of ours
        pipes = [_Pipe(self, down_reader, up_writer), _Pipe(self, up_reader, down_writer)]
        tasks = [asyncio.create_task(coro) for p in pipes for coro in (p.read_loop(), p.write_loop())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            for w in (down_writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _serve(args) -> None:
    relay = Relay(_address(args.listen), _address(args.to), args.one_way_ms / 1000)
    host, port = await relay.start()
    print(f"{host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def read_stdin() -> None:  # a thread: one number of milliseconds per line sets the delay
        for line in sys.stdin:
            with contextlib.suppress(ValueError):
                value = float(line.strip()) / 1000
                loop.call_soon_threadsafe(setattr, relay, "delay", value)
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    threading.Thread(target=read_stdin, daemon=True).start()
    await done
    await relay.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on (port 0: any free port)")
    parser.add_argument("--to", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--one-way-ms", type=float, default=0.0, help="delay each way, in ms")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
