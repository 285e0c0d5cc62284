"""Standby servers (``stamen server --standby``, ``stamen/server/standby.py``) with real processes.

Each test starts its own swarm (they kill servers). Model of 4 blocks. A standby holds blocks
without serving them (in no route, in no coverage), notices by pinging that their server was
SIGKILLed, and goes online for them within seconds without loading; a client generating meanwhile
finishes with the tokens and logits of a failure-free run. Of two standbys holding the same blocks,
exactly one takes the hole; a standby whose blocks cover only part of a hole serves them at once and
loads the rest.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

import pytest
import torch
from hivemind.p2p import PeerID
from prometheus_client.parser import text_string_to_metric_families
from transformers import LogitsProcessorList

from stamen import AutoDistributedModelForCausalLM
from stamen.client import loop
from stamen.client.health import read_health
from stamen.dht.records import ServerState, fetch_servers
from stamen.rpc.calls import ping
from stamen.testing.models import TRAINED_SPREAD, save_random_llama
from stamen.testing.scores import ScoreRecorder
from stamen.testing.swarm import LocalSwarm, ServerProcess
from stamen.types import Span

pytestmark = pytest.mark.swarm

NAME = "llama-standby"
BLOCKS = 4
NEW_TOKENS = 24
THREADS = ("--torch-threads", "1")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return str(save_random_llama(tmp_path_factory.mktemp("standby") / NAME, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=BLOCKS, num_attention_heads=4,
        num_key_value_heads=2, **TRAINED_SPREAD), seed=3))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _peer(server: ServerProcess, timeout: float = 60.0) -> str:
    """A server's own peer id, from the address it logs when it starts."""
    return re.search(r"visible at \S*/p2p/(\w+)", _wait_log(server, r"visible at \S*/p2p/\w+", timeout)).group(1)


def _wait_log(server: ServerProcess, pattern: str, timeout: float = 120.0) -> str:
    """The server's log once it matches ``pattern`` (polled; the server exiting or the timeout fails)."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
        if re.search(pattern, text):
            return text
        assert server.proc.poll() is None, f"{server.log_path.name} exited:\n{server.log_tail()}"
        assert time.monotonic() < deadline, f"no {pattern!r} in {server.log_path.name} after {timeout} s:\n" \
                                            f"{server.log_tail()}"
        time.sleep(0.2)


def _scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _health(model: str, swarm: LocalSwarm, *flags: str) -> str:
    """What ``stamen health`` prints."""
    out = subprocess.run([sys.executable, "-m", "stamen", "health", model, "--initial-peers", *swarm.initial_peers,
                          *flags], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _states(swarm: LocalSwarm, peers: list[str]) -> list[ServerState | None]:
    records = fetch_servers(swarm.client_dht(), NAME, BLOCKS)
    return [records[p].state if p in records else None for p in peers]


@dataclass
class Run:
    tokens: torch.Tensor
    logits: torch.Tensor
    route: dict[Span, str]
    """Blocks -> peer id, the session's final route."""
    recoveries: int


class _KillAt:
    """A logits processor that SIGKILLs ``victim`` at step ``at_step`` and, from then on, watches
    the DHT (on a thread) for ``standby`` to be announced online."""

    def __init__(self, swarm: LocalSwarm, victim: ServerProcess, standby: str, at_step: int):
        self.swarm, self.victim, self.standby, self.at_step = swarm, victim, standby, at_step
        self.count, self.killed_at, self.online_at = 0, None, None
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __call__(self, input_ids, scores):
        self.count += 1
        if self.count == self.at_step:
            self.swarm.signal_group(self.victim, signal.SIGKILL)
            self.killed_at = time.monotonic()
            self.thread.start()
        return scores

    def _watch(self) -> None:
        dht = self.swarm.client_dht()
        while time.monotonic() < self.killed_at + 60:
            record = fetch_servers(dht, NAME, BLOCKS, [2]).get(self.standby)
            if record is not None and record.state == ServerState.ONLINE:
                self.online_at = time.monotonic()
                return
            time.sleep(0.05)


def _generate(model, prompt: torch.Tensor, fault: _KillAt | None = None) -> Run:
    scores = ScoreRecorder()
    processors = LogitsProcessorList([scores] + ([fault] if fault is not None else []))
    with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None, logits_processor=processors)
        return Run(out, torch.stack(scores.seen, 1), {hop.blocks: hop.peer_id for hop in session.route},
                   session.recoveries)


def test_a_standby_takes_over_a_killed_server_without_loading(model_path, tmp_path):
    with LocalSwarm(log_dir=tmp_path) as swarm:
        swarm.start_bootstrap()
        swarm.add_server(model_path, Span(0, 2), *THREADS, "--throughput", "100")
        victim = swarm.add_server(model_path, Span(2, 4), *THREADS, "--throughput", "50")
        swarm.wait_online(NAME, BLOCKS)
        port = _free_port()
        # placed by standby_start: the blocks with the fewest servers, then the least throughput
        standby = swarm.add_auto_server(model_path, "--standby", "--num-blocks", "2", "--metrics-port", str(port),
                                        *THREADS, "--throughput", "100")
        peer, victim_peer = _peer(standby), _peer(victim)
        _wait_log(standby, r"standby holding blocks \[2:4\)")
        record = fetch_servers(swarm.client_dht(), NAME, BLOCKS)[peer]
        assert record.state == ServerState.STANDBY and record.span == Span(2, 4)
        # `stamen health` lists it as a standby and counts it nowhere
        text = _health(model_path, swarm)
        assert re.search(rf"…{peer[-12:]} +\[2:4\) +standby ", text), text
        assert "live servers / steps/s): 0:1/100 1:1/100 2:1/50 3:1/50" in text
        assert re.search(rf"standbys \(hold blocks.*…{peer[-12:]} \[2:4\)", text), text

        model = AutoDistributedModelForCausalLM.from_pretrained(
            model_path, initial_peers=swarm.initial_peers, request_timeout=10, max_retries=3, ban_timeout=600)
        try:
            assert peer not in {s.peer_id for s in model.swarm.servers(refresh=True)}  # no route can use it
            assert loop.run(ping(model.swarm.p2p, PeerID.from_base58(peer), 2.0)) is None  # no handler answers
            prompt = torch.randint(3, model.block_config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
            expected = _generate(model, prompt)
            assert expected.recoveries == 0 and expected.route[Span(2, 4)] == victim_peer
            assert peer not in expected.route.values()
            kill = _KillAt(swarm, victim, peer, at_step=8)
            got = _generate(model, prompt, kill)
            after = read_health(model.swarm.dht, NAME, BLOCKS)  # on the client's DHT and libp2p replica
        finally:
            model.shutdown()
        kill.thread.join(60)
        victim.proc.wait(30)
        # online within 5 s of the kill, and the client replayed into it: the same tokens and logits
        assert kill.online_at is not None and kill.online_at - kill.killed_at < 5.0, standby.log_tail()
        assert got.recoveries >= 1 and got.route[Span(2, 4)] == peer
        assert torch.equal(got.tokens, expected.tokens)
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
        # no weight loading: the log says so, and the metrics count the takeover and no loaded block
        log = standby.log_path.read_text()
        assert re.search(r"standby taking over blocks \[2:4\) .* without loading", log), log[-3000:]
        assert "moving to" not in log
        samples = _scrape(port)
        assert samples[("stamen_standby_takeovers_total", ())] == 1
        assert samples[("stamen_standby_blocks_served_at_takeover_total", ())] == 2
        assert samples[("stamen_standby_blocks_loaded_at_takeover_total", ())] == 0
        info = next(dict(labels) for name, labels in samples if name == "stamen_server_info")
        assert info["state"] == "online" and (info["start"], info["end"]) == ("2", "4")
        assert after.uncovered_blocks == [] and after.standbys == []
        assert next(r for r in after.servers if r.peer_id == peer).live


def test_of_two_standbys_exactly_one_takes_the_hole(model_path, tmp_path):
    with LocalSwarm(log_dir=tmp_path) as swarm:
        swarm.start_bootstrap()
        swarm.add_server(model_path, Span(0, 2), *THREADS, "--throughput", "100")
        victim = swarm.add_server(model_path, Span(2, 4), *THREADS, "--throughput", "100")
        swarm.wait_online(NAME, BLOCKS)
        # both hold [2:4) and notice together (no jitter): the fresh look and the claims settle it
        standbys = [swarm.add_server(model_path, Span(2, 4), "--standby", "--standby-jitter", "0", *THREADS,
                                     "--throughput", "100") for _ in range(2)]
        peers = [_peer(s) for s in standbys]
        for s in standbys:
            _wait_log(s, r"standby holding blocks \[2:4\)")
        assert _states(swarm, peers) == [ServerState.STANDBY] * 2
        swarm.signal_group(victim, signal.SIGKILL)
        killed = time.monotonic()
        victim.proc.wait(30)
        swarm.wait_for(NAME, BLOCKS, lambda records: any(
            records.get(p) and records[p].state == ServerState.ONLINE for p in peers), "a standby online",
            timeout=15, servers=standbys)
        assert time.monotonic() - killed < 5.0
        time.sleep(4.0)  # past the other's next looks, jitter and claim
        states = _states(swarm, peers)
        assert sorted(states) == sorted([ServerState.ONLINE, ServerState.STANDBY]), states
        logs = [s.log_path.read_text() for s in standbys]
        took = [bool(re.search(r"standby taking over blocks \[2:4\)", log)) for log in logs]
        assert took == [state == ServerState.ONLINE for state in states], "\n".join(log[-2000:] for log in logs)


def test_a_standby_loads_the_rest_of_a_wider_hole(model_path, tmp_path):
    """Servers [0:1) [1:3) [3:4); the standby holds [2:4) (block 3 is the weakest); [1:3) dies: it
    serves [2:4) at once, then moves to [1:3), loading block 1 only."""
    with LocalSwarm(log_dir=tmp_path) as swarm:
        swarm.start_bootstrap()
        swarm.add_server(model_path, Span(0, 1), *THREADS, "--throughput", "100")
        victim = swarm.add_server(model_path, Span(1, 3), *THREADS, "--throughput", "100")
        swarm.add_server(model_path, Span(3, 4), *THREADS, "--throughput", "5")
        swarm.wait_online(NAME, BLOCKS)
        port = _free_port()
        standby = swarm.add_auto_server(model_path, "--standby", "--num-blocks", "2", "--metrics-port", str(port),
                                        *THREADS, "--throughput", "100")
        peer = _peer(standby)
        _wait_log(standby, r"standby holding blocks \[2:4\)")
        swarm.signal_group(victim, signal.SIGKILL)
        victim.proc.wait(30)
        swarm.wait_for(NAME, BLOCKS, lambda records: records.get(peer) and records[peer].state == ServerState.ONLINE
                       and records[peer].span == Span(1, 3), "the standby serving [1:3)", timeout=60,
                       servers=[standby])
        log = _wait_log(standby, r"moved from \[2:4\)", timeout=30)
        assert re.search(r"standby taking over blocks \[2:4\) .* without loading", log)
        assert re.search(r"moving to \[1:3\), loading 1 blocks", log), log[-3000:]
        samples = _scrape(port)
        assert samples[("stamen_standby_takeovers_total", ())] == 1
        assert samples[("stamen_standby_blocks_loaded_at_takeover_total", ())] == 1
        records = fetch_servers(swarm.client_dht(), NAME, BLOCKS)
        online = [r.span for p, r in records.items() if r.state == ServerState.ONLINE and p != _peer(victim)]
        assert sorted(online) == [Span(0, 1), Span(1, 3), Span(3, 4)]
