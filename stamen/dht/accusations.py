"""Accusations: signed evidence that a server returned wrong hidden states, shared in the DHT.

Key ``"{model}.accusations"``, subkey: the accuser's owner subkey (``[owner:<its public key>]``,
signed by that key like server records, see ``dht/node.py``), value: ``{"accusations": [...]}``,
the accuser's latest accusations (at most ``MAX_ACCUSATIONS``). The accuser is the subkey's peer,
never a field of the value, so nobody can accuse in another peer's name; whatever else the value
says is the accuser's claim. What a record may be trusted for: that the accuser, who holds that
key, says so. Not that the accused lied: a lying client can accuse an honest server, so clients
treat an accusation as a reason to audit that server at every step, and ban it only after their
own audit fails.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import partial

import torch
from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stamen.dht.node import SwarmDHT, owner_peer_id
from stamen.types import MAX_RECORD_TTL, ModelName, PeerIDStr

logger = logging.getLogger(__name__)

MAX_ACCUSATIONS = 32
"""Most accusations one accuser keeps in its record (the newest)."""


class Accusation(BaseModel):
    """One audit that a server failed: it disagreed with the majority of servers given the same inputs."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    accused: str
    """Peer id of the server whose outputs disagreed with the majority."""
    start: int = Field(ge=0)
    """First block of the audited span."""
    end: int = Field(gt=0)
    """One past its last block."""
    inputs_digest: str
    """``digest`` of the span's inputs (the audited positions, as the accuser sent them)."""
    accused_digest: str
    """``digest`` of the accused server's outputs for those inputs."""
    majority_digest: str
    """``digest`` of the outputs the other servers agreed on."""
    witnesses: list[str] = Field(default_factory=list)
    """Peer ids of the servers that formed the majority."""
    error: float = Field(ge=0)
    """The accused outputs' relative error against the majority's (max over positions)."""
    tolerance: float = Field(ge=0)
    """The tolerance the accuser allowed for the servers' precisions."""
    at: float
    """DHT time of the audit."""


@dataclass(frozen=True)
class SignedAccusation:
    """An accusation as a reader gets it: the accuser is the peer whose key signed the record."""

    accuser: PeerIDStr
    accusation: Accusation


def accusations_key(model: ModelName) -> str:
    return f"{model}.accusations"


def digest(tensor: torch.Tensor) -> str:
    """blake2b (16 bytes, hex) over a tensor's dtype, shape and bytes."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def publish_accusations(dht: SwarmDHT, model: ModelName, accusations: list[Accusation],
                        ttl: float = MAX_RECORD_TTL) -> None:
    """Store this peer's accusations (the newest ``MAX_ACCUSATIONS``) under its owner subkey, signed
    by its key, for ``ttl`` seconds (at most ``MAX_RECORD_TTL``: a client that keeps seeing a liar
    accuses it again)."""
    if ttl > MAX_RECORD_TTL:
        raise ValueError(f"an accusation TTL of {ttl} s is over the {MAX_RECORD_TTL:.0f} s that DHT peers accept")
    value = {"accusations": [a.model_dump(mode="json") for a in accusations[-MAX_ACCUSATIONS:]]}
    dht.run_coroutine(partial(_store, key=accusations_key(model), subkey=dht.owner_subkey, value=value,
                              expiration=get_dht_time() + ttl))


async def _store(dht: DHT, node: DHTNode, key: str, subkey: bytes, value: dict, expiration: float) -> bool:
    return await node.store(key, value, expiration, subkey=subkey)


def fetch_accusations(dht: DHT, model: ModelName) -> list[SignedAccusation]:
    """Every accusation stored for the model, with its accuser taken from the signed subkey."""
    entry = dht.run_coroutine(partial(_get, key=accusations_key(model)))
    found: list[SignedAccusation] = []
    if entry is None or not isinstance(entry.value, dict):
        return found
    for subkey, item in entry.value.items():
        accuser = owner_peer_id(subkey)
        if accuser is None or not isinstance(item.value, dict):
            continue
        for raw in item.value.get("accusations", [])[:MAX_ACCUSATIONS]:
            try:
                found.append(SignedAccusation(accuser, Accusation.model_validate(raw)))
            except ValidationError:
                logger.debug("ignoring a malformed accusation by %s", accuser)
    return found


async def _get(dht: DHT, node: DHTNode, key: str):
    # every accuser's subkey, merged over the peers that hold the key (as ``fetch_servers`` reads records)
    return (await node.get_many([key], sufficient_expiration_time=float("inf"))).get(key)


def accused_counts(accusations: list[SignedAccusation]) -> dict[str, int]:
    """Accused peer -> how many distinct peers accuse it."""
    accusers: dict[str, set[str]] = {}
    for a in accusations:
        accusers.setdefault(a.accusation.accused, set()).add(a.accuser)
    return {peer: len(by) for peer, by in sorted(accusers.items())}
