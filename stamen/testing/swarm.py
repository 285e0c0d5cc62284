"""Start a real swarm on 127.0.0.1: a bootstrap DHT peer and server processes through the CLI.

Used by the test fixtures, the demo and the benchmarks. Readiness is awaited by reading the DHT,
never by sleeping a fixed time; ``stop`` always reaps every process it started.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from stamen.process import children_die_with_me
from stamen.types import Span


@dataclass
class ServerProcess:
    model: str
    span: Span | None
    """The span given with --blocks (None: the server places itself)."""
    proc: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalSwarm:
    """A bootstrap peer plus any number of span servers, each a real ``stamen`` process."""

    def __init__(self, log_dir: str | Path | None = None, env: dict[str, str] | None = None):
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="stamen-swarm-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.env["STAMEN_PARENT_PID"] = str(os.getpid())  # children stop if this process dies without stopping them
        self.bootstrap: subprocess.Popen | None = None
        self.initial_peers: list[str] = []
        self.servers: list[ServerProcess] = []
        self.apis: list[subprocess.Popen] = []
        self._dht = None

    def _cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "stamen", *args]

    def start_bootstrap(self, timeout: float = 60.0) -> list[str]:
        log = open(self.log_dir / "dht.log", "w")
        self.bootstrap = subprocess.Popen(self._cmd("dht"), stdout=subprocess.PIPE, stderr=log, text=True,
                                          env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        line = ""
        while not line.startswith("/ip4/"):  # the first line appears once the peer is up
            line = self.bootstrap.stdout.readline().strip()
            if self.bootstrap.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bootstrap peer failed to start; see {self.log_dir / 'dht.log'}")
        self.initial_peers = [line]
        return self.initial_peers

    def add_server(self, model: str | Path, span: Span, *extra: str, lie: str | None = None) -> ServerProcess:
        """A server of ``span``; ``lie`` ("noise", "zero"): a lying one for audit tests (``testing/liar.py``)."""
        index = len(self.servers)
        log_path = self.log_dir / f"server{index}-{span.start}-{span.end}.log"
        args = [str(model), "--initial-peers", *self.initial_peers, "--blocks", f"{span.start}:{span.end}", *extra]
        cmd = self._cmd("server", *args) if lie is None else \
            [sys.executable, "-m", "stamen.testing.liar", lie, "server", *args]
        # each server leads its own process group: its hivemind DHT process and libp2p daemons
        # die with it when a test kills the group (as when a machine vanishes)
        proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True)
        server = ServerProcess(str(model), span, proc, log_path, args)
        self.servers.append(server)
        return server

    def start_api(self, model: str | Path, *extra: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
        """Start ``stamen api`` on a free port; returns the process and its base URL (``.../v1``),
        once ``GET /v1/models`` answers."""
        import socket
        import urllib.request

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        log_path = self.log_dir / f"api{len(self.apis)}.log"
        proc = subprocess.Popen(
            self._cmd("api", str(model), "--initial-peers", *self.initial_peers, "--port", str(port), *extra),
            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.apis.append(proc)
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5):
                    return proc, url
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"stamen api did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.2)

    def add_auto_server(self, model: str | Path, *extra: str) -> ServerProcess:
        """A server started without ``--blocks``: it chooses (and may change) its span itself."""
        log_path = self.log_dir / f"server{len(self.servers)}-auto.log"
        args = [str(model), "--initial-peers", *self.initial_peers, *extra]
        proc = subprocess.Popen(self._cmd("server", *args), stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True)
        server = ServerProcess(str(model), None, proc, log_path, args)
        self.servers.append(server)
        return server

    def wait_for(self, model_name: str, num_blocks: int, condition, what: str, timeout: float = 120.0,
                 servers: list[ServerProcess] | None = None):
        """Poll the DHT until ``condition(records)`` (peer id -> ServerRecord) returns something truthy,
        and return it; a listed server exiting or the timeout raises with the servers' log tails."""
        from stamen.dht.records import fetch_servers

        servers = self.servers if servers is None else servers
        deadline, delay = time.monotonic() + timeout, 0.2
        while True:
            result = condition(fetch_servers(self.client_dht(), model_name, num_blocks))
            if result:
                return result
            for s in servers:
                if s.proc.poll() is not None:
                    raise RuntimeError(f"server {s.log_path.name} exited with {s.proc.returncode}:\n{s.log_tail()}")
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {s.log_path}\n{s.log_tail()}" for s in servers)
                raise TimeoutError(f"not true after {timeout} s: {what}\n{tails}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def client_dht(self):
        if self._dht is None:
            from stamen.dht.node import create_dht

            with children_die_with_me():  # a harness killed with SIGKILL leaves no DHT process or p2pd behind
                self._dht = create_dht(self.initial_peers, client_mode=True)
        return self._dht

    def wait_online(self, model_name: str, num_blocks: int, servers: list[ServerProcess] | None = None,
                    timeout: float = 180.0) -> None:
        """Wait until every given server (default: all) is announced online for ``model_name``."""
        from stamen.dht.records import ServerState, fetch_servers

        servers = self.servers if servers is None else servers
        # servers can share a span: count them, so that one online server does not stand for two
        wanted = collections.Counter(
            (s.span.start, s.span.end) for s in servers if s.proc.poll() is None and s.span is not None)
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            for s in servers:
                if s.proc.poll() is not None:
                    raise RuntimeError(f"server {s.span} exited with {s.proc.returncode}:\n{s.log_tail()}")
            records = fetch_servers(self.client_dht(), model_name, num_blocks)
            online = collections.Counter(
                (r.start, r.end) for r in records.values() if r.state == ServerState.ONLINE)
            if all(online[span] >= count for span, count in wanted.items()):
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {s.log_path}\n{s.log_tail()}" for s in servers)
                raise TimeoutError(f"servers not online after {timeout} s (online: {sorted(online.items())}):\n{tails}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)  # fixtures wait here for every server they start

    @staticmethod
    def signal_group(server: ServerProcess, sig: int) -> None:
        """Send ``sig`` to the server and every process it started (SIGKILL: the machine is gone)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, sig)

    def stop_server(self, server: ServerProcess, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the server alone (a graceful stop), wait, then reap its whole process group."""
        if server.proc.poll() is None:
            server.proc.send_signal(sig)
            try:
                server.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        return server.proc.returncode

    def stop(self) -> None:
        procs = self.apis + [s.proc for s in self.servers] + ([self.bootstrap] if self.bootstrap else [])
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # leftovers: DHT processes, libp2p daemons
        if self._dht is not None:
            self._dht.shutdown()
            self._dht = None

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
