"""The swarm of ``stamen bench network``: a ``LocalSwarm`` whose bootstrap peer and servers run in the
network namespaces of a ``stamen.testing.netns`` topology (or on 127.0.0.1 without one), each server
behind a latency relay (``stamen.testing.latency``) whose round trip can change between cells."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from stamen.testing.netns import Topology
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

SERVER_PORT, RELAY_PORT = 31330, 31331
"""Fixed ports inside the namespaces (each has its own port space)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NetSwarm(LocalSwarm):
    """``LocalSwarm`` whose processes run in the topology's namespaces, each server behind a relay."""

    def __init__(self, log_dir: Path, topo: Topology | None):
        super().__init__(log_dir)
        self.topo = topo
        self.relays: list[subprocess.Popen] = []
        self._host: str | None = None

    def address(self, host: str) -> str:
        return self.topo.addresses[host] if self.topo else "127.0.0.1"

    def _prefix(self, host: str) -> list[str]:
        return self.topo.exec_prefix(host) if self.topo else []

    def _cmd(self, *args: str) -> list[str]:
        cmd = [*self._prefix(self._host), *super()._cmd(*args)] if self._host else super()._cmd(*args)
        if args == ("dht",):
            cmd += ["--host", self.address("client")]
        return cmd

    def start_bootstrap(self, timeout: float = 60.0) -> list[str]:
        self._host = "client"
        try:
            return super().start_bootstrap(timeout)
        finally:
            self._host = None

    def add_relayed_server(self, model: str, span: Span, index: int) -> None:
        host = f"s{index}"
        addr = self.address(host)
        server_port, relay_port = (SERVER_PORT, RELAY_PORT) if self.topo else (_free_port(), 0)
        relay = subprocess.Popen(
            [*self._prefix(host), sys.executable, "-m", "stamen.testing.latency", "--listen", f"{addr}:{relay_port}",
             "--to", f"{addr}:{server_port}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log_dir / f"relay{index}.log", "w"),
            text=True, start_new_session=True)
        self.relays.append(relay)
        listen = relay.stdout.readline().strip()
        if not listen:
            raise RuntimeError(f"relay for {host} did not start; see {self.log_dir / f'relay{index}.log'}")
        relay_port = int(listen.rpartition(":")[2])
        self._host = host
        try:
            self.add_server(model, span, "--host", addr, "--port", str(server_port),
                            "--announce-maddrs", f"/ip4/{addr}/tcp/{relay_port}", "--throughput", "100")
        finally:
            self._host = None

    def set_rtt(self, rtt_ms: float) -> None:
        for relay in self.relays:
            relay.stdin.write(f"{rtt_ms / 2}\n")
            relay.stdin.flush()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            for relay in self.relays:
                with contextlib.suppress(Exception):
                    relay.stdin.close()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(relay.pid, signal.SIGTERM)
                try:
                    relay.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(relay.pid, signal.SIGKILL)
                    relay.wait()
            self.relays = []
