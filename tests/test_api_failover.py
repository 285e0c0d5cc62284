"""A server dies during an API request: with a replacement the request finishes with the same text;
without one it ends with a clear error, never a hang. Own swarm: the test kills servers; each test
first starts or stops [10:20) servers to have the number it needs, so each passes alone and in
any order."""

from __future__ import annotations

import re
import signal
import threading
import time

import openai
import pytest
import torch

from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The history of the city of Rome begins"
pytestmark = pytest.mark.swarm


@pytest.fixture(scope="module")
def swarm(smol_dir, tmp_path_factory):
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("failover-logs")) as s:
        s.start_bootstrap()
        for span in (Span(0, 10), Span(10, 20), Span(20, 30), Span(10, 20)):  # a spare for [10:20)
            s.add_server(smol_dir, span, "--torch-threads", "1")
        s.wait_online(MODEL, 30)
        _, s.api_url = s.start_api(smol_dir)
        s.api_log = s.log_dir / f"api{len(s.apis) - 1}.log"
        s.smol_dir = smol_dir
        yield s


def _live_middle(swarm) -> list:
    return [s for s in swarm.servers if s.span == Span(10, 20) and s.proc.poll() is None]


def _middle_servers(swarm, count: int) -> None:
    """Exactly ``count`` live [10:20) servers: start more (an earlier test may have killed them) or
    stop the extra ones (gracefully: they announce that they leave)."""
    live = _live_middle(swarm)
    for server in live[count:]:
        swarm.stop_server(server)
    new = [swarm.add_server(swarm.smol_dir, Span(10, 20), "--torch-threads", "1")
           for _ in range(count - len(live))]
    if new:
        swarm.wait_online(MODEL, 30, servers=new)
    assert len(_live_middle(swarm)) == count


def _replacements(swarm) -> int:
    """Hops the API's sessions replaced so far (its log says so at WARNING)."""
    return len(re.findall(r"session \w+: replaced ", swarm.api_log.read_text()))


@pytest.fixture(scope="module")
def probe(swarm):
    """A swarm client of our own, to ask servers for their free cache."""
    from stamen.client.config import ClientConfig
    from stamen.client.swarm import Swarm
    from stamen.types import ModelName

    client = Swarm(ModelName(MODEL), 30, ClientConfig(initial_peers=swarm.initial_peers))
    yield client
    client.shutdown()


def _busy_middle_server(swarm, probe):
    """The live [10:20) server of the request's route: it holds a session (less free cache than an
    idle one) and computes the steps the [0:10) server pushes to it. (A spare [10:20) server may
    hold the client's audit session of that hop too, whose steps are never pushed.)"""
    from stamen.client import loop
    from stamen.rpc.calls import call_info

    def info(peer: str):
        return loop.run(call_info(probe.p2p, probe.peer(peer), 10))

    holding = []
    for server in swarm.servers:
        if server.span != Span(10, 20) or server.proc.poll() is not None:
            continue
        # a server logs its own address when it starts (its log may name other servers too)
        peer = re.search(r"visible at \S*/p2p/(\w+)", server.log_path.read_text()).group(1)
        reply = info(peer)
        if reply.cache_tokens_left < 8192:
            holding.append((server, peer, reply.pushed_steps))
    deadline = time.monotonic() + 1.0
    while len(holding) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        grown = [server for server, peer, pushed in holding if info(peer).pushed_steps > pushed]
        if len(grown) == 1:
            return grown[0]
    return holding[0][0] if holding else None


def _stream_in_thread(url: str, max_tokens: int):
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=180)
    state = {"deltas": [], "finish": None, "error": None}

    def run() -> None:
        try:
            stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                               stream=True)
            for chunk in stream:
                state["deltas"].append(chunk.choices[0].text)
                state["finish"] = chunk.choices[0].finish_reason or state["finish"]
        except Exception as e:  # checked by the test
            state["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, state


def _wait_for_text(state, pieces: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len([d for d in state["deltas"] if d]) < pieces and state["error"] is None:
        assert time.monotonic() < deadline, "no text arrived"
        time.sleep(0.05)


def test_server_killed_mid_request_with_replacement_gives_the_same_text(swarm, probe, smol_local):
    """The [10:20) server of a streaming request is killed while the request still has most of its
    tokens to go: the API's session replays into the spare (its log says so) and the text equals
    transformers' greedy text."""
    _middle_servers(swarm, 2)
    model, tok = smol_local
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=60, do_sample=False)
    expected = tok.decode(out[0, len(ids):], skip_special_tokens=True).rstrip("\ufffd")

    replaced_before = _replacements(swarm)
    thread, state = _stream_in_thread(swarm.api_url, 60)
    _wait_for_text(state, 5)
    victim = _busy_middle_server(swarm, probe)
    assert victim is not None, "no [10:20) server holds the request's session"
    swarm.signal_group(victim, signal.SIGKILL)
    assert state["finish"] is None and state["error"] is None  # the kill landed mid-request
    victim.proc.wait(30)
    thread.join(timeout=180)
    assert not thread.is_alive(), "the request hung after a server died"
    assert state["error"] is None, state["error"]
    assert "".join(state["deltas"]) == expected
    assert state["finish"] == "length"
    assert _replacements(swarm) > replaced_before  # a replay happened: the text did not come from luck


def test_server_killed_without_replacement_ends_the_request_with_an_error(swarm, probe):
    _middle_servers(swarm, 1)
    thread, state = _stream_in_thread(swarm.api_url, 400)
    _wait_for_text(state, 3)
    start = time.monotonic()
    victim = _busy_middle_server(swarm, probe)
    assert victim is not None
    swarm.signal_group(victim, signal.SIGKILL)
    assert state["finish"] is None and state["error"] is None  # the kill landed mid-request
    victim.proc.wait(30)
    thread.join(timeout=180)
    assert not thread.is_alive(), "the request hung after the last server of its blocks died"
    assert isinstance(state["error"], openai.APIError), state
    assert "10" in str(state["error"])  # names the blocks that have no server
    assert time.monotonic() - start < 150
