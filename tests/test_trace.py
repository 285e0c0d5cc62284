"""The step timeline (``stamen/trace.py``) across real processes, and inline compute on servers."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from stamen import AutoDistributedModelForCausalLM, trace
from stamen.bench import timeline as trace_timeline
from stamen.server.compute import in_fresh_thread
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span


def test_long_work_runs_on_a_thread_of_its_own():
    async def main():
        here = await in_fresh_thread(threading.get_ident)
        with pytest.raises(ZeroDivisionError):
            await in_fresh_thread(lambda: 1 / 0)
        return here

    assert asyncio.run(main()) != threading.get_ident()


@pytest.mark.swarm
def test_timeline_shows_the_push_chain(model_dirs, tmp_path):
    """Two servers traced at once: in every decoding step the second server computes from the first
    server.s push, and its output is the last
    thing the client waits for; the tokens equal transformers'."""
    model_dir, traces = model_dirs["llama-gqa"], str(tmp_path / "trace")
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(3, ref.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    expected = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    with LocalSwarm(log_dir=tmp_path / "logs", env={"STAMEN_TRACE_DIR": traces}) as swarm:
        swarm.start_bootstrap()
        for span in (Span(0, 3), Span(3, 6)):
            swarm.add_server(model_dir, span, "--torch-threads", "1")
        swarm.wait_online("llama-gqa", 6)
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers,
                                                                request_timeout=30)
        trace.enable(traces)
        trace.set_role("client")
        try:
            got = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        finally:
            trace.disable()
            model.shutdown()
    assert torch.equal(got, expected)
    events = trace.load(traces)  # the servers wrote theirs when they stopped
    assert {role for _, role, _, _ in events} >= {"client", "server0", "server3"}
    starts = [(t, step) for t, role, event, step in events if role == "client" and event == "c.step"]
    assert len(starts) == 8  # the prompt, then 7 decoding steps
    for (t0, step), (t1, _) in zip(starts[1:], [*starts[2:], (float("inf"), -1)], strict=True):
        window = [(role, event, s) for t, role, event, s in events if t0 <= t < t1]
        order = [(role, event) for role, event, _ in window]
        push = order.index(("server3", "s.recv_push"))
        assert ("server3", "s.recv_push", step) in window
        assert order.index(("server0", "s.recv")) < order.index(("server0", "s.c1")) < push
        assert push < order.index(("server3", "s.c0")) < order.index(("client", "c.recv3"))
        assert order.index(("client", "c.recv3")) < order.index(("client", "c.main"))


def _ms(x: float) -> int:
    return int(x * 1e6)


def test_critical_path_from_marks():
    """Two decoding steps through [0:2) and [2:3) after the prompt; a step whose push went missing
    (the second server computed from the client's copy) is left out."""
    spans = [Span(0, 2), Span(2, 3)]

    def step(t0: float, pushed: bool = True) -> list:
        return [(_ms(t0), "client", "c.step", 1), (_ms(t0 + 0.5), "client", "c.out0", -1),
                (_ms(t0 + 1.5), "server0", "s.recv", 1), (_ms(t0 + 1.7), "server0", "s.c0", -1),
                (_ms(t0 + 11.7), "server0", "s.c1", -1), (_ms(t0 + 12.0), "server0", "s.push_out", -1),
                (_ms(t0 + 13.0), "server2", "s.recv_push" if pushed else "s.recv", 1),
                (_ms(t0 + 13.5), "server2", "s.c0", -1), (_ms(t0 + 18.5), "server2", "s.c1", -1),
                (_ms(t0 + 18.7), "server2", "s.reply_out", -1), (_ms(t0 + 19.9), "client", "c.recv2", -1),
                (_ms(t0 + 20.2), "client", "c.main", 1), (_ms(t0 + 24.2), "client", "c.logits", -1)]

    events = sorted(step(0) + step(100) + step(200) + step(300, pushed=False))
    path = trace_timeline.critical_path(events, spans)
    assert path["steps"] == 2  # the prompt and the unpushed step are not counted
    parts = path["parts_ms"]
    assert parts["network: client -> server [0:2)"] == pytest.approx(1.0)
    assert parts["server [0:2): compute (2 blocks)"] == pytest.approx(10.0)
    assert parts["network: server [0:2) -> server [2:3)"] == pytest.approx(1.0)
    assert parts["server [2:3): compute (1 blocks)"] == pytest.approx(5.0)
    assert parts["network: server [2:3) -> client"] == pytest.approx(1.2)
    totals = path["totals_ms"]
    assert totals["step"] == pytest.approx(24.2)
    assert totals["servers' compute"] == pytest.approx(15.0)
    assert totals["network legs"] == pytest.approx(3.2)
    assert totals["client head"] == pytest.approx(4.0)
    assert totals["hand-offs, encoding, decoding"] == pytest.approx(24.2 - 15.0 - 3.2 - 4.0)
