"""Inference audits (``ClientConfig.verify``): lying servers are caught, honest ones of any precision
never are, and a forged accusation does not get an honest server banned.

One swarm of real processes for a 4-block model: [0:2) by two float32 servers (preferred by routes),
a bfloat16 and an int8 one; [2:4) by two float32 servers, a bfloat16 one, and three liars that
routes prefer when allowed (higher announced throughput): ``noise`` (the real server with its
outputs perturbed by 1 % relative noise, ``stamen/testing/liar.py``), ``zero`` (outputs zeroed) and
``weights`` (a server of another random checkpoint under the same DHT prefix). Each run allows at
most one liar (the others are in ``blocked_servers``) and forgets the client's earlier verdicts, so
every run detects anew. The honest swarm's tokens come from the same client with audits off and
every liar blocked.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from stamen import AutoDistributedModelForCausalLM
from stamen.client.health import read_health
from stamen.dht.accusations import Accusation, fetch_accusations, publish_accusations
from stamen.dht.health import format_health
from stamen.testing.models import TRAINED_SPREAD, save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

pytestmark = pytest.mark.swarm

NAME = "llama-audit"
RUNS, NEW_TOKENS, PROMPT = 24, 40, 8
"""Generations per test, their new tokens (past ``audit_every`` = 32: each hop is audited on the prefill,
after 32 decoding steps and at the end) and the prompt's length."""
CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, **TRAINED_SPREAD)
ONE = ("--torch-threads", "1")
SERVERS = {  # name -> (span, extra args, lie)
    "F0": (Span(0, 2), ("--throughput", "100"), None),
    "F0b": (Span(0, 2), ("--throughput", "100"), None),
    "B0": (Span(0, 2), ("--throughput", "5", "--dtype", "bfloat16"), None),
    "Q0": (Span(0, 2), ("--throughput", "5", "--quant", "int8"), None),
    "F1": (Span(2, 4), ("--throughput", "100"), None),
    "F1b": (Span(2, 4), ("--throughput", "100"), None),
    "B1": (Span(2, 4), ("--throughput", "5", "--dtype", "bfloat16"), None),
    "noise": (Span(2, 4), ("--throughput", "1000"), "noise"),
    "zero": (Span(2, 4), ("--throughput", "1000"), "zero"),
    "weights": (Span(2, 4), ("--throughput", "1000", "--dht-prefix", NAME), "weights"),
}
LIARS = ("noise", "zero", "weights")
LOW_PRECISION = ("B0", "Q0", "B1")


class Audited:
    def __init__(self, swarm: LocalSwarm, model, ids: dict[str, str]):
        self.swarm, self.model, self.ids = swarm, model, ids
        self._expected: dict[int, torch.Tensor] = {}

    def prompt(self, seed: int) -> torch.Tensor:
        return torch.randint(3, self.model.block_config.vocab_size, (1, PROMPT),
                             generator=torch.Generator().manual_seed(seed))

    def expected(self, seed: int) -> torch.Tensor:
        """What the honest float32 swarm generates (no liar, no audit)."""
        if seed not in self._expected:
            self._expected[seed] = self.generate(seed, [*LIARS, *LOW_PRECISION], verify="off")[0]
        return self._expected[seed]

    def generate(self, seed: int, blocked: list[str], verify: str = "audit"):
        """One generation with ``blocked`` (names) out of every route and audit; (tokens, session, first route)."""
        swarm = self.model.swarm
        swarm.forget_verdicts()
        swarm.config.blocked_servers = [self.ids[n] for n in blocked]
        swarm.config.verify = verify
        with self.model.inference_session(max_length=PROMPT + NEW_TOKENS) as session:
            first_route = [h.peer_id for h in session.route]
            tokens = self.model.generate(self.prompt(seed), max_new_tokens=NEW_TOKENS, eos_token_id=None)
        return tokens, session, first_route


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit-models")
    path = str(save_random_llama(root / NAME, CONFIG, seed=3))
    other = str(save_random_llama(root / "other-weights", CONFIG, seed=4))
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("audit-logs")) as swarm:
        swarm.start_bootstrap()
        for name, (span, extra, lie) in SERVERS.items():
            swarm.add_server(other if lie == "weights" else path, span, *ONE, *extra, "--public-name", name,
                             lie=lie if lie in ("noise", "zero") else None)
        records = swarm.wait_for(NAME, 4, lambda r: r if sum(x.state == "online" for x in r.values()) == len(SERVERS)
                                 else None, "every server online", timeout=240)
        ids = {r.public_name: peer for peer, r in records.items()}
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                ban_timeout=600)
        try:
            yield Audited(swarm, model, ids)
        finally:
            model.shutdown()


@pytest.mark.parametrize("lie", LIARS)
def test_liar_detected_and_tokens_honest(audited, lie):
    """24 seeded generations of 40 tokens; the liar is allowed in about 3 of 4 (seeded) and then is
    every route's choice for [2:4). Whenever the route used it, it is caught within 32 decoding steps
    and accused in the DHT; in every run the tokens equal the honest swarm's (after the rollback, with
    the other hops' audit sessions rewound; audits send the auditors only their new positions). (Only
    float32 servers besides the liar, so that the tokens may be compared exactly.)"""
    rng = random.Random(f"audit-{lie}")
    liar = audited.ids[lie]
    used_runs = incremental = 0
    for run in range(RUNS):
        allowed = rng.random() < 0.75
        blocked = [x for x in LIARS if x != lie or not allowed] + list(LOW_PRECISION)
        tokens, session, first_route = audited.generate(run, blocked)
        assert torch.equal(tokens, audited.expected(run)), f"run {run}: tokens differ from the honest swarm's"
        caught = [(peer, steps) for peer, steps in session.detections]
        incremental += sum(a.verdict == "passed" and 0 < a.positions[0] and a.sent == a.positions[1] - a.positions[0]
                           for a in session.audits)  # on an audit session: the new positions only
        assert all(peer == liar for peer, _ in caught), f"run {run}: an honest server was convicted: {caught}"
        if liar in first_route:
            used_runs += 1
            assert caught and caught[0][1] <= 32, f"run {run}: liar not caught within 32 steps: {caught}; audits: " + \
                "; ".join(f"{a.peer_id[-6:]} by {a.auditor[-6:]} {a.positions} {a.verdict} {a.error:.3g} step {a.step}"
                          for a in session.audits)
            assert liar not in [h.peer_id for h in session.route]
        else:
            assert not caught
    assert used_runs >= RUNS // 2 and incremental >= RUNS
    accusations = [a for a in fetch_accusations(audited.swarm.client_dht(), NAME)
                   if a.accuser == audited.model.swarm.dht.peer_id.to_base58()]
    assert any(a.accusation.accused == liar and (a.accusation.start, a.accusation.end) == (2, 4)
               and a.accusation.error > a.accusation.tolerance for a in accusations)
    health = read_health(audited.swarm.client_dht(), NAME, 4)
    assert health.accused.get(liar, 0) >= 1
    assert f"…{liar[-12:]}" in format_health(health).split("accused of wrong outputs")[1]


def test_mixed_precision_never_accused(audited):
    """Honest float32, bfloat16 and int8 servers of the same blocks audit each other over 24
    generations (routes forced through each by blocking others): no audit fails."""
    rng = random.Random("mixed")
    pairs = set()
    for run in range(RUNS):
        blocked = list(LIARS) + rng.sample(["F0", "F0b", "B0", "Q0"], 2) + [rng.choice(["F1", "F1b", "B1"])]
        _, session, _ = audited.generate(1000 + run, [b for b in blocked if b is not None])
        verdicts = [(a.peer_id, a.verdict, a.error, a.tolerance) for a in session.audits
                    if a.verdict not in ("passed", "cancelled")]
        assert not verdicts, f"run {run}: {verdicts}"
        assert not audited.model.swarm.convicted
        names = {v: k for k, v in audited.ids.items()}
        pairs |= {frozenset((names[a.peer_id], names[a.auditor])) for a in session.audits if a.verdict == "passed"}
    precisions = {"F0": "f", "F0b": "f", "F1": "f", "F1b": "f", "B0": "b", "B1": "b", "Q0": "q"}
    mixed = {frozenset(precisions[n] for n in pair) for pair in pairs}
    assert {frozenset("fb"), frozenset("fq")} <= mixed, pairs  # float32 against bfloat16 and against int8
    own = [a for a in fetch_accusations(audited.swarm.client_dht(), NAME)
           if a.accuser == audited.model.swarm.dht.peer_id.to_base58() and a.accusation.accused not in
           [audited.ids[x] for x in LIARS]]
    assert not own


def test_forged_accusation_does_not_ban(audited):
    """A test client accuses an honest server in the DHT; another client audits that server at every
    step (the accusation is a reason to look), finds nothing, keeps using it, and the tokens are honest."""
    honest = audited.ids["F1"]
    forger = audited.swarm.client_dht()
    publish_accusations(forger, NAME, [Accusation(
        accused=honest, start=2, end=4, inputs_digest="0" * 32, accused_digest="1" * 32, majority_digest="2" * 32,
        witnesses=[], error=1.0, tolerance=0.001, at=0.0)])
    swarm = audited.model.swarm
    forger_id = forger.peer_id.to_base58()
    assert any(a.accuser == forger_id and a.accusation.accused == honest
               for a in fetch_accusations(audited.swarm.client_dht(), NAME))
    deadline = time.monotonic() + 30
    while honest not in swarm.accused():  # another peer's view of the DHT
        assert time.monotonic() < deadline, "the accusation never reached the client's view"
        swarm.servers(refresh=True)
        time.sleep(0.2)
    tokens, session, first_route = audited.generate(7, [*LIARS, "F1b", "B0", "Q0"])  # the route must take F1
    assert honest in first_route and honest in [h.peer_id for h in session.route]
    assert torch.equal(tokens, audited.expected(7))
    checks = [a for a in session.audits if a.peer_id == honest]
    assert len(checks) >= NEW_TOKENS // 2 and all(a.verdict == "passed" for a in checks)
    assert honest not in swarm.convicted and not session.detections


def _tiles(audits, end: int, start: int = 0) -> bool:
    """Whether the audits' positions tile [start, end) in order, each sending exactly its own positions."""
    at = start
    for a in audits:
        if a.positions[0] != at or a.sent != a.positions[1] - a.positions[0]:
            return False
        at = a.positions[1]
    return at == end


@pytest.mark.parametrize("verify", ["audit", "strict"])
def test_audits_are_incremental(audited, verify):
    """Each hop's auditor keeps an audit inference session: an audit sends it only the positions since
    the last one, so over a generation the positions sent per hop add up to the generation's length
    (a stateless audit sends every position so far: quadratic), in audit mode and in strict mode (every
    step, one position each). The audit sessions are closed with the session."""
    blocked = [*LIARS, *LOW_PRECISION]
    tokens, session, first_route = audited.generate(11, blocked, verify=verify)
    assert torch.equal(tokens, audited.expected(11))
    stepped = PROMPT + NEW_TOKENS - 1  # the last token is never fed back
    assert [h.peer_id for h in session.route] == first_route
    for peer in first_route:
        mine = [a for a in session.audits if a.peer_id == peer]
        assert all(a.verdict == "passed" for a in mine), [(a.positions, a.verdict) for a in mine]
        assert len({a.auditor for a in mine}) == 1  # sticks to one auditor
        assert _tiles(mine, stepped), [(a.positions, a.sent) for a in mine]
        assert sum(a.sent for a in mine) == stepped
        assert len(mine) >= (NEW_TOKENS if verify == "strict" else 3)
    assert all(h.auditor is None for h in session._hops)  # closed with the session


def test_rollback_rewinds_audit_sessions(audited):
    """A second generate that diverges from the first (``rollback`` to an earlier position) leaves the
    auditors' caches ahead of the hops': the next audit of each hop is sent at the rolled-back
    position, which rewinds the auditor's cache there (no fresh session, no position sent again
    before it), every audit passes, and the tokens are the honest swarm's."""
    swarm = audited.model.swarm
    swarm.forget_verdicts()
    swarm.config.blocked_servers = [audited.ids[n] for n in (*LIARS, *LOW_PRECISION)]
    swarm.config.verify = "audit"
    keep = PROMPT + 10
    with audited.model.inference_session(max_length=PROMPT + NEW_TOKENS) as session:
        first = audited.model.generate(audited.prompt(12), max_new_tokens=32, eos_token_id=None)
        before = len(session.audits)
        auditors = {h.hop.peer_id: h.auditor for h in session._hops}
        assert all(a is not None and a.cached == PROMPT + 31 for a in auditors.values())
        second = audited.model.generate(first[:, :keep], max_new_tokens=NEW_TOKENS - 10, eos_token_id=None)
        assert {h.hop.peer_id: h.auditor for h in session._hops} == auditors  # the same audit sessions
    expected = audited.expected(12)
    assert torch.equal(first, expected[:, : PROMPT + 32]) and torch.equal(second, expected)
    assert all(a.verdict == "passed" for a in session.audits), [(a.positions, a.verdict) for a in session.audits]
    for peer in auditors:
        after = [a for a in session.audits[before:] if a.peer_id == peer]
        # from the rolled-back position on (its token was sent again), not from 0
        assert _tiles(after, PROMPT + NEW_TOKENS - 1, keep - 1), [(a.positions, a.sent) for a in after]
