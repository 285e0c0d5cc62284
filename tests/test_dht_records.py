"""DHT records against forgery, and `stamen health` against dead servers, on a real swarm.

Records are bound to the announcing peer's key (a forger writes only under its own key, and a
reader derives the peer id from the key), their expirations are capped, and `stamen health` counts
only servers that answer a ping. One small swarm (4 blocks): A[0:2) is the only server of its
blocks, B serves [2:4). The last test kills B, so it stays last.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time
from typer.testing import CliRunner

from stamen.cli.main import app
from stamen.dht.health import SwarmHealth, format_health
from stamen.dht.node import MAX_RECORD_TTL, RecordPolicy, create_dht, owner_peer_id, read_identity
from stamen.dht.records import ServerRecord, ServerState, block_key, fetch_servers
from stamen.testing.models import save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

MODEL = "llama-rec"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
HOUR = 3600.0


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    path = save_random_llama(tmp_path_factory.mktemp("rec") / MODEL, TINY)
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("rec-logs")) as swarm:
        swarm.start_bootstrap()
        common = ("--torch-threads", "1", "--decode-threads", "1", "--throughput", "100")
        servers = {"A": swarm.add_server(path, Span(0, 2), *common), "B": swarm.add_server(path, Span(2, 4), *common)}
        swarm.wait_online(MODEL, 4)
        records = fetch_servers(swarm.client_dht(), MODEL, 4)
        peers = {name: next(p for p, r in records.items() if r.span == s.span) for name, s in servers.items()}
        yield swarm, servers, peers, path


def _offline(span: Span, **extra) -> dict:
    return ServerRecord(state=ServerState.OFFLINE, start=span.start, end=span.end, throughput=1e6,
                        cache_tokens_left=0, dtype="float32", version="0").model_dump(mode="json") | extra


def _forger(swarm: LocalSwarm, client_mode: bool = False) -> tuple[DHT, bytes]:
    """A peer of the swarm that runs plain hivemind, signing with a key of its own, and that key's subkey."""
    signer = RSASignatureValidator(RSAPrivateKey())
    dht = DHT(initial_peers=swarm.initial_peers, start=True, client_mode=client_mode, record_validators=[signer])
    return dht, signer.local_public_key


def test_a_records_peer_id_is_derived_from_its_owner_key(tmp_path):
    key = RSAPrivateKey()
    identity = tmp_path / "id.key"
    identity.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=key.to_bytes()).SerializeToString())
    subkey = RSASignatureValidator(key).local_public_key
    assert owner_peer_id(subkey) == PeerID.from_identity(identity.read_bytes()).to_base58()  # libp2p's derivation
    assert RSASignatureValidator(read_identity(identity)).local_public_key == subkey
    for not_owned in (b"QmPeer", "[owner:x]", subkey + b" ", b"[owner:ssh-rsa AAAAnotakey]", [subkey]):
        assert owner_peer_id(not_owned) is None
    identity.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=b"k" * 64).SerializeToString())
    with pytest.raises(ValueError, match="must be an RSA key"):
        read_identity(identity)


def test_an_identity_file_keeps_the_peer_and_its_record_key(tmp_path):
    identity, peers = tmp_path / "peer.key", []
    for _ in range(2):  # written by the first start, read by the second
        dht = create_dht([], host="127.0.0.1", identity=identity)
        try:
            peers.append((dht.peer_id.to_base58(), owner_peer_id(dht.owner_subkey)))
        finally:
            dht.shutdown()
    assert peers[0] == peers[1] and peers[0][0] == peers[0][1]


def test_the_record_policy_refuses_records_no_key_owns_and_overlong_ones():
    owned = MSGPackSerializer.dumps(RSASignatureValidator(RSAPrivateKey()).local_public_key)
    policy, now = RecordPolicy(), get_dht_time()
    assert policy.validate(DHTRecord(b"key", owned, b"value", now + 60))
    assert not policy.validate(DHTRecord(b"key", owned, b"value", now + MAX_RECORD_TTL + 10))
    assert not policy.validate(DHTRecord(b"key", MSGPackSerializer.dumps("QmPeer"), b"value", now + 60))
    assert not policy.validate(DHTRecord(b"key", MSGPackSerializer.dumps(None), b"value", now + 60))  # no subkey
    assert not policy.validate(DHTRecord(b"key", b"\xc1", b"value", now + 60))  # not msgpack
    # hivemind's averagers key their (unsigned) records by the raw peer id: allowed for a minute only
    bare = MSGPackSerializer.dumps(PeerID.from_base58("QmXx3xfRFbhC5KXWVCdQxvaVmSLiAzr5adxMrJJbU7vn3v").to_bytes())
    assert policy.validate(DHTRecord(b"key", bare, b"value", now + 30))
    assert not policy.validate(DHTRecord(b"key", bare, b"value", now + 120))
    assert not policy.validate(DHTRecord(b"key", MSGPackSerializer.dumps(b"\x12\x20short"), b"value", now + 30))


@pytest.mark.swarm
def test_a_forged_offline_record_does_not_take_an_honest_server_out(rec):
    from stamen import AutoDistributedModelForCausalLM

    swarm, servers, peers, path = rec
    honest = peers["A"]
    forger, mine = _forger(swarm)
    try:
        forged = _offline(Span(0, 2), peer_id=honest)
        keys = [block_key(MODEL, block) for block in (0, 1)]
        for key in keys:
            # the honest server's peer id as the subkey (how records were keyed before), for an hour:
            # the swarm refuses it; the forger keeps a copy of its own, which readers do not believe
            assert not forger.store(key, forged, get_dht_time() + HOUR, subkey=honest, exclude_self=True)
            forger.store(key, forged, get_dht_time() + HOUR, subkey=honest)
        for key in keys:
            # the honest server's own subkey, which the forger cannot sign
            owner = next(s for s in forger.get(key, latest=True).value if owner_peer_id(s) == honest)
            assert not forger.store(key, forged, get_dht_time() + HOUR, subkey=owner, exclude_self=True)
            # the forger's own subkey, claiming the honest peer id in the value: stored, as the forger's record
            assert forger.store(key, forged, get_dht_time() + 60, subkey=mine, exclude_self=True)
        forger_peer = owner_peer_id(mine)
        reader = create_dht(swarm.initial_peers, client_mode=True)
        try:
            records = fetch_servers(reader, MODEL, 4)
        finally:
            reader.shutdown()
        assert records[honest].state == ServerState.ONLINE
        assert records[forger_peer].state == ServerState.OFFLINE and forger_peer != honest
        # a client still routes and generates through the honest server
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        try:
            assert model.swarm.route()[0].peer_id == honest
            out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, eos_token_id=None)
            assert out.shape == (1, 7)
        finally:
            model.shutdown()
    finally:
        forger.shutdown()


@pytest.mark.swarm
def test_a_record_past_the_ttl_cap_is_refused(rec):
    swarm = rec[0]
    forger, mine = _forger(swarm, client_mode=True)
    try:
        key, value = block_key(MODEL, 3), _offline(Span(3, 4))
        assert not forger.store(key, value, get_dht_time() + HOUR, subkey=mine, exclude_self=True)
        assert not forger.store(key, value, get_dht_time() + MAX_RECORD_TTL + 30, subkey=mine, exclude_self=True)
        assert forger.store(key, value, get_dht_time() + MAX_RECORD_TTL - 30, subkey=mine, exclude_self=True)
    finally:
        forger.shutdown()


@pytest.mark.swarm
def test_health_does_not_count_a_killed_server(rec):
    """Runs last: it kills B, the only server of blocks 2 and 3, whose online record stays in the DHT."""
    swarm, servers, peers, path = rec
    swarm.signal_group(servers["B"], signal.SIGKILL)
    servers["B"].proc.wait()

    # the command in this process (a subprocess would spend its time importing torch)
    result = CliRunner().invoke(app, ["health", str(path), "--initial-peers", *swarm.initial_peers, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["block_servers"] == [1, 1, 0, 0] and report["uncovered_blocks"] == [2, 3]
    assert report["bottleneck_throughput"] == 0
    rows = {s["peer_id"]: s for s in report["servers"]}
    assert rows[peers["B"]]["state"] == "online" and rows[peers["B"]]["reachable"] is False  # as announced
    assert not rows[peers["B"]]["live"] and rows[peers["A"]]["live"] and rows[peers["A"]]["reachable"]
    assert report["unreachable"] == [peers["B"]]
    text = format_health(SwarmHealth.model_validate(report))  # what `stamen health` prints without --json
    assert "uncovered blocks: 2, 3" in text
    assert f"unreachable (announced online, did not answer a ping; not counted): …{peers['B'][-12:]} [2:4)" in text
