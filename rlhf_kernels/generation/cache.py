"""A static KV cache: one K and one V tensor [B, Hkv, S_max, D] per layer, allocated once.

Layout in time: the prompt's left padding is kept (row b's first `start[b]` slots are padding,
never read: attention starts at `start[b]`), so every sequence writes its next token at the
same slot. A cache can be reused by later calls with a batch and a length it can hold; it reads
rows [:B] (the batch is the outermost dimension, so the views stay contiguous).
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch, self.max_len = batch, max_len
        self.layout = (num_layers, kv_heads, head_dim, dtype, torch.device(device))

    def fits(self, num_layers, batch, kv_heads, max_len, head_dim, dtype, device) -> bool:
        layout = (num_layers, kv_heads, head_dim, dtype, torch.device(device))
        return layout == self.layout and batch <= self.batch and max_len <= self.max_len

    def layer(self, index: int, batch: int):
        """(K, V) of one layer for the first `batch` rows."""
        return self.keys[index][:batch], self.values[index][:batch]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
