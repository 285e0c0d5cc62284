"""Process hygiene: child processes that die with the process that started them, and the checks
that run before anything starts (ports, peer addresses).

Each stamen process that joins the DHT starts hivemind's DHT process (``DHT`` is a forked
``multiprocessing`` process), and that process starts a libp2p daemon (``p2pd``, spawned on its
uvloop). The daemon exits by itself within a fraction of a second when the DHT process dies, but
the DHT process never watches its parent: a server, client or harness killed with SIGKILL left
both running for good. ``children_die_with_me`` ties them to their parent with the parent-death
signal (``prctl(PR_SET_PDEATHSIG)``, Linux): forks made inside it (the DHT process) get SIGKILL when
the thread that forked them ends, and so do the processes those children start (the daemon:
uvloop runs Python's after-fork hooks between its fork and the exec, and the signal survives
exec). The signal follows the forking *thread*, so a fork from a thread other than the main one
instead starts a watchdog thread in the child that ends it when its parent is gone. Such a child
also drops the Python signal handlers it inherited (a server's event loop catches SIGTERM: its DHT
process ignored SIGTERM, and an exit that waited for it hung). Nothing changes for forks made
elsewhere (a program using stamen as a library keeps its own semantics).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator

from stamen.errors import StamenError

PR_SET_PDEATHSIG = 1
PARENT_POLL_SECONDS = 0.5
"""How often a watchdog thread (forks from a thread other than the main one) checks its parent."""


class PortInUseError(StamenError):
    """The address to listen on is taken by another process."""

    code = "port_in_use"


class PeerAddressError(StamenError):
    """An initial peer is not a multiaddr with a peer id (``/ip4/HOST/tcp/PORT/p2p/PEER_ID``)."""

    code = "peer_address"


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()  # loaded before any fork: a child only calls it


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when the thread that forked it ends
    (survives exec; a child's own children do not inherit it). False where it cannot be set."""
    return _prctl is not None and _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


_armed: dict[int, int] = {}
"""Thread id -> depth of ``children_die_with_me`` blocks open on that thread."""
_forking: dict[int, tuple[bool, int]] = {}
"""Thread id -> (forking from the main thread, parent pid), set just before an armed fork."""
_hooks_lock = threading.Lock()
_hooks_installed = False


def _before_fork() -> None:
    ident = threading.get_ident()
    if _armed.get(ident):
        _forking[ident] = (threading.current_thread() is threading.main_thread(), os.getpid())


def _after_fork_in_parent() -> None:
    _forking.pop(threading.get_ident(), None)


def _after_fork_in_child() -> None:
    ident = threading.get_ident()
    forked = _forking.pop(ident, None)
    if forked is None:
        _armed.clear()  # an unarmed fork: nothing of the parent's carries over
        return
    from_main_thread, parent = forked
    # the child's only thread stays armed: what it starts (the DHT process's p2pd) dies with it
    _armed.clear()
    _armed[ident] = 1
    _forking.clear()
    # a forked child inherits the parent's Python signal handlers (a server's event loop catches
    # SIGTERM through a wakeup fd it shares with the child): the child must die of SIGTERM itself
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if from_main_thread and set_parent_death_signal(signal.SIGKILL):
        if os.getppid() != parent:  # the parent died before the signal was set
            os._exit(1)
        return
    threading.Thread(target=_watch_parent, args=(parent,), name="stamen-parent-watchdog", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def _install_hooks() -> None:
    global _hooks_installed
    with _hooks_lock:
        if not _hooks_installed:
            os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                                after_in_child=_after_fork_in_child)
            _hooks_installed = True


@contextlib.contextmanager
def children_die_with_me() -> Iterator[None]:
    """Processes forked by this thread inside the block (hivemind's DHT process) and the ones they
    start (its p2pd) die when this process does, even by SIGKILL."""
    _install_hooks()
    ident = threading.get_ident()
    _armed[ident] = _armed.get(ident, 0) + 1
    try:
        yield
    finally:
        _armed[ident] -= 1
        if not _armed[ident]:
            del _armed[ident]


def check_port_free(host: str, port: int, what: str = "listen") -> None:
    """Raise ``PortInUseError`` (one line) if ``host:port`` cannot be bound now; port 0 (any free
    port) always passes. Bind first, start after: a daemon listening with SO_REUSEPORT (libp2p's)
    would otherwise share the port with the one already there."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed listener's TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUseError(f"cannot {what} on {host}:{port}: the port is in use") from None
            raise PortInUseError(f"cannot {what} on {host}:{port}: {e.strerror or e}") from None


def check_peer_addresses(peers: list[str]) -> None:
    """Raise ``PeerAddressError`` (one line) for the first initial peer that is not a full multiaddr."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    for peer in peers:
        try:
            PeerID.from_base58(Multiaddr(peer)["p2p"])
        except Exception as e:  # multiaddr and base58 raise types of their own, KeyError without /p2p/
            reason = "it names no peer id" if isinstance(e, KeyError) else str(e) or type(e).__name__
            raise PeerAddressError(f"initial peer {peer!r} is not a multiaddr like /ip4/HOST/tcp/PORT/p2p/PEER_ID "
                                   f"({reason})") from None
