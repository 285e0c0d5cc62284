"""Test hosts in Linux network namespaces, joined by a bridge, with ``tc tbf`` bandwidth limits.

``Topology(hosts)`` creates one namespace per host (``stamen-<pid>-<name>``) and one more holding
a bridge; each host has one veth (``eth0``, address ``10.77.0.<n>/24``) whose other end is a port
of the bridge. ``set_rate("100mbit")`` puts a token-bucket filter on both ends of every veth: a
host's egress is its uplink, the bridge port's egress its downlink. Nothing touches the root
namespace's interfaces. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): ``namespaces_unavailable()``
says why not. ``teardown`` (also run at exit) deletes every namespace the topology made, which
destroys its veths and bridge; ``cleanup_stale`` removes those of dead processes.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

PREFIX = "stamen-"
SUBNET = "10.77.0"
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def namespaces_unavailable() -> str | None:
    """None if this process can create network namespaces with veths and tbf; else the reason."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the `ip` and `tc` commands (iproute2) are not installed"
    if os.geteuid() != 0:
        return f"creating network namespaces needs root (CAP_NET_ADMIN); running as uid {os.geteuid()}"
    name = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run("ip", "netns", "add", name)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns add` failed: {e}"
    try:
        _run("ip", "netns", "exec", name, "ip", "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "1gbit",
             "burst", "256kb", "latency", "50ms")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"namespace created but veth/tbf setup failed: {e}"
    finally:
        _run("ip", "netns", "del", name, check=False)
    return None


def tbf_args(rate: str) -> list[str]:
    """``tbf`` parameters for ``rate`` (e.g. ``100mbit``): a burst of ~4 ms of traffic, at least
    128 KiB (veth sends TSO segments of up to 64 KiB), and a queue of 100 ms."""
    bits = parse_rate(rate)
    burst = max(128 * 1024, int(bits / 8 / 250))
    return ["rate", rate, "burst", str(burst), "latency", "100ms"]


def parse_rate(rate: str) -> float:
    """Bits per second of a tc rate such as ``1gbit``, ``100mbit``, ``500kbit``."""
    m = re.fullmatch(r"([\d.]+)\s*([kmg]?)bit", rate.strip().lower())
    if not m:
        raise ValueError(f"not a rate like 100mbit: {rate!r}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


class Topology:
    """Hosts in their own network namespaces on one bridge (see the module's docstring)."""

    def __init__(self, hosts: list[str]):
        self.tag = f"{PREFIX}{os.getpid()}"
        self.hosts = list(hosts)
        self.bridge_ns = f"{self.tag}-br"
        self.addresses = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(self.hosts)}
        self.created: list[str] = []
        self.rate: str | None = None
        atexit.register(self.teardown)
        try:
            self._create()
        except BaseException:
            self.teardown()
            raise

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def exec_prefix(self, host: str) -> list[str]:
        """Prefix a command with this to run it in ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns(host)]

    def _in(self, ns: str, *args: str) -> None:
        _run("ip", "netns", "exec", ns, *args)

    def _create(self) -> None:
        for ns in [self.bridge_ns, *map(self.ns, self.hosts)]:
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            self._in(ns, "ip", "link", "set", "lo", "up")
        self._in(self.bridge_ns, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.bridge_ns, "ip", "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            port = f"p{i}"
            # created in the bridge namespace, then one end moved into the host's
            self._in(self.bridge_ns, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0",
                     "netns", self.ns(host))
            self._in(self.bridge_ns, "ip", "link", "set", port, "master", "br0")
            self._in(self.bridge_ns, "ip", "link", "set", port, "up")
            self._in(self.ns(host), "ip", "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0")
            self._in(self.ns(host), "ip", "link", "set", "eth0", "up")

    def _links(self):
        for i, host in enumerate(self.hosts):
            yield self.ns(host), "eth0"  # the host's uplink
            yield self.bridge_ns, f"p{i}"  # its downlink

    def set_rate(self, rate: str | None) -> None:
        """Limit every host's uplink and downlink to ``rate`` (a tc rate, e.g. ``1gbit``); None: no limit."""
        for ns, dev in self._links():
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            if rate is not None:
                self._in(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", *tbf_args(rate))
        self.rate = rate

    def qdiscs(self) -> str:
        """``tc qdisc show`` of every limited link (for logs)."""
        return "\n".join(f"{ns} {dev}: " + _run("ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev,
                                                 check=False).stdout.strip() for ns, dev in self._links())

    def teardown(self) -> None:
        """Delete every namespace this topology created (their veths and the bridge go with them)."""
        while self.created:
            _run("ip", "netns", "del", self.created.pop(), check=False)
        with contextlib.suppress(Exception):
            atexit.unregister(self.teardown)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    result = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.startswith(prefix)]


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete ``stamen-<pid>-*`` namespaces whose process is gone; returns their names."""
    removed = []
    for name in list_namespaces(prefix):
        m = re.match(rf"{re.escape(prefix)}(\d+)-", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


@contextlib.contextmanager
def entered(ns: str):
    """Move the calling thread into namespace ``ns`` for the block, then back. Processes forked
    by this thread meanwhile (hivemind's DHT process and its libp2p daemon) stay in ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(NETNS_DIR / ns) as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original namespace failed")
