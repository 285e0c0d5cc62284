"""The server's LoRA adapter cache: block adapters by content hash, least recently used first out.

This bounded cache is the only thing a server keeps between training calls: a client uploads a
block's adapter once per version of its weights and then names it by hash in forward, backward and
inference requests, so any server can serve any client and a restarted server costs one upload.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from stamen.errors import InvalidRequestError, UnknownAdapterError
from stamen.models.config import BlockConfig
from stamen.models.lora import BlockLoRA, adapter_hash, block_lora_from_tensors
from stamen.wire.messages import AdapterMeta


class AdapterCache:
    def __init__(self, config: BlockConfig, max_bytes: int, dtype: torch.dtype, device: torch.device | str):
        self.config, self.max_bytes, self.dtype, self.device = config, max_bytes, dtype, device
        self._items: OrderedDict[str, BlockLoRA] = OrderedDict()
        self.nbytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def put(self, meta: AdapterMeta, tensors: list[torch.Tensor]) -> None:
        """Check shapes and the content hash, then store (converted to the compute dtype)."""
        lora = block_lora_from_tensors(self.config, meta.targets, meta.rank, meta.scaling, tensors)
        actual = adapter_hash(lora)
        if actual != meta.hash:
            raise InvalidRequestError(
                f"adapter hash mismatch: the request says {meta.hash}, the weights hash to {actual}")
        if meta.hash in self._items:
            self._items.move_to_end(meta.hash)
            return
        lora = lora.to(self.dtype, self.device)
        if lora.nbytes > self.max_bytes:
            raise InvalidRequestError(f"an adapter of {lora.nbytes} bytes exceeds the cache of {self.max_bytes} bytes")
        self._items[meta.hash] = lora
        self.nbytes += lora.nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def get_many(self, hashes: list[str]) -> list[BlockLoRA]:
        """The adapters named by ``hashes`` (marked recently used), or UnknownAdapterError naming the missing."""
        missing = [h for h in hashes if h not in self._items]
        if missing:
            raise UnknownAdapterError(f"unknown adapters: {','.join(missing)}")
        for h in hashes:
            self._items.move_to_end(h)
        return [self._items[h] for h in hashes]
