"""Every DHT peer of a swarm comes from ``create_dht``, so that every peer runs the same record validators.

A peer's libp2p identity is an RSA key, and the same key signs the peer's records. A server's
records live under the subkey ``[owner:<its public key>]``: hivemind's ``RSASignatureValidator``
refuses such a record unless that key signed it, and ``RecordPolicy`` refuses every record whose
subkey is not such an owner subkey, and every record that expires more than ``MAX_RECORD_TTL``
seconds ahead. Readers take a record's peer id from its subkey's key (``owner_peer_id``: a libp2p
peer id is the hash of the peer's public key, and libp2p authenticates it on every connection),
never from the value. So a peer can write records only for itself, for at most ``MAX_RECORD_TTL``.
The one exception: records under a bare peer id for at most ``UNSIGNED_RECORD_TTL`` seconds,
which hivemind's averaging writes unsigned (matchmaking) and no server or accusation reader trusts.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import base58
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from stamen.types import MAX_RECORD_TTL, PeerIDStr

UNSIGNED_RECORD_TTL = 60.0
"""Seconds an unsigned record (subkey: a bare peer id, as hivemind's averagers write) may live."""

_OWNER = re.compile(rb"\[owner:(.+)\]", re.DOTALL)
"""hivemind's ``RSASignatureValidator.PUBLIC_KEY_FORMAT``, as the whole subkey."""


class SwarmDHT(DHT):
    """A hivemind DHT peer made by ``create_dht``."""

    owner_subkey: bytes
    """``[owner:<this peer's public key>]``: the subkey of this peer's records; only this peer can sign them."""


def create_dht(initial_peers: Sequence[str], *, host: str | None = None, port: int = 0,
               identity: str | os.PathLike | None = None, announce_maddrs: Sequence[str] | None = None,
               client_mode: bool = False) -> SwarmDHT:
    """A DHT peer of the swarm, started: listening on ``host:port`` (port 0: any free port; host None:
    hivemind's default), with the swarm's record validators. ``identity``: a private key file (an RSA
    key in libp2p's format, as ``hivemind`` writes it; created if absent) for a stable peer id;
    without one, a fresh key."""
    kwargs: dict = {}
    tmpdir = None
    if identity is not None and os.path.isfile(identity):
        path, key = str(identity), read_identity(identity)
    else:
        if identity is None:
            tmpdir = tempfile.mkdtemp(prefix="stamen-identity-")
            path = os.path.join(tmpdir, "identity.key")
        else:
            path = str(identity)
        key = RSAPrivateKey()
        _write_identity(path, key)
        kwargs["check_if_identity_free"] = False  # a new key: nobody has it
    if host is not None:
        kwargs["host_maddrs"] = [f"/ip4/{host}/tcp/{port}"]
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    signer = RSASignatureValidator(key)
    try:
        dht = SwarmDHT(initial_peers=list(initial_peers), start=True, client_mode=client_mode, identity_path=path,
                       record_validators=[signer, RecordPolicy()], **kwargs)
    finally:
        if tmpdir is not None:  # the libp2p daemon has read it (or failed to start)
            shutil.rmtree(tmpdir, ignore_errors=True)
    dht.owner_subkey = signer.local_public_key
    if owner_peer_id(dht.owner_subkey) != dht.peer_id.to_base58():
        dht.shutdown()
        raise RuntimeError(f"the DHT runs as {dht.peer_id} but its records would be signed for "
                           f"{owner_peer_id(dht.owner_subkey)}")
    return dht


class RecordPolicy(RecordValidatorBase):
    """Refuses a record unless it expires at most ``max_ttl`` seconds from now and its subkey is an
    owner subkey (``[owner:<RSA public key>]``: hivemind's ``RSASignatureValidator`` then checks the
    owner's signature), or, for at most ``unsigned_ttl`` seconds, a bare libp2p peer id: hivemind's
    averaging records (matchmaking, state-sharing declarations) and training stages' progress are
    keyed so, unsigned in hivemind itself. No reader of servers' records or accusations trusts a
    subkey that is not an owner subkey, and a forged progress record can only start a round that the
    group's gathered metadata then refuses. Runs before the signature check, so a malformed key is
    refused here."""

    def __init__(self, max_ttl: float = MAX_RECORD_TTL, unsigned_ttl: float = UNSIGNED_RECORD_TTL):
        self.max_ttl, self.unsigned_ttl = max_ttl, unsigned_ttl

    def validate(self, record: DHTRecord) -> bool:
        ttl = record.expiration_time - get_dht_time()
        if ttl > self.max_ttl:
            return False
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:  # not msgpack: not ours
            return False
        if owner_peer_id(subkey) is not None:
            return True
        return ttl <= self.unsigned_ttl and bare_peer_id(subkey) is not None

    @property
    def priority(self) -> int:
        return 20  # validated before RSASignatureValidator (10), which would raise on a malformed key


def bare_peer_id(subkey: object) -> PeerIDStr | None:
    """The peer id a subkey is, when it is the raw bytes of a libp2p peer id (a sha2-256 multihash),
    as hivemind's averagers key their records; else None."""
    if not isinstance(subkey, bytes) or len(subkey) != 34 or not subkey.startswith(b"\x12\x20"):
        return None
    return PeerIDStr(base58.b58encode(subkey).decode())


def owner_peer_id(subkey: object) -> PeerIDStr | None:
    """The peer id of the RSA key in an owner subkey (``[owner:ssh-rsa ...]``), else None."""
    return _owner_peer_id(subkey) if isinstance(subkey, bytes) else None


@functools.lru_cache(maxsize=4096)  # readers see the same few subkeys under every block key, every few seconds
def _owner_peer_id(subkey: bytes) -> PeerIDStr | None:
    match = _OWNER.fullmatch(subkey)
    if match is None:
        return None
    try:
        key = serialization.load_ssh_public_key(match.group(1))
    except (ValueError, UnsupportedAlgorithm):
        return None
    return _peer_id(key) if isinstance(key, rsa.RSAPublicKey) else None


def _peer_id(public_key: rsa.RSAPublicKey) -> PeerIDStr:
    """libp2p's peer id of an RSA key: the sha2-256 multihash of the key's protobuf (type RSA, DER)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerIDStr(base58.b58encode(b"\x12\x20" + hashlib.sha256(proto).digest()).decode())


def read_identity(path: str | os.PathLike) -> RSAPrivateKey:
    """The RSA key of a libp2p identity file."""
    proto = crypto_pb2.PrivateKey.FromString(Path(path).read_bytes())
    if proto.key_type != crypto_pb2.RSA:
        raise ValueError(f"{path}: the identity must be an RSA key (it signs the peer's DHT records), "
                         f"not key type {crypto_pb2.KeyType.Name(proto.key_type)}")
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": proto.data})  # how hivemind unpickles a key: DER bytes
    return key


def _write_identity(path: str, key: RSAPrivateKey) -> None:
    """Write ``key`` as a libp2p identity file, readable by its owner only (as hivemind does)."""
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=key.to_bytes()).SerializeToString()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
