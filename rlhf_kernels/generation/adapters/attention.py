"""The two attention modes of a decoder step, behind one call: attend(layer, q, k, v, scale).

q [B, T, Hq, D], k / v [B, T, Hkv, D] (positional encoding already applied) -> [B, T, Hq * D].
Prefill runs the prompt through SDPA and writes its K / V into the cache; decode runs one token
per sequence through our decode-attention kernel, which appends K / V in place. Whole-sequence
forwards without a cache (sequence.py) use the prefill's attention alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class SequenceAttention:
    """Causal attention over whole sequences [B, T] with a 0/1 mask: left padding (prompts),
    right padding (responses after EOS) or both; pads are never attended to.

    A padding query has no visible key: it attends to itself only, so that no row is fully
    masked (SDPA would give NaN, and NaN * 0 would leak into real rows through V)."""

    def __init__(self, attention_mask: torch.Tensor, windows):
        batch, length = attention_mask.shape
        self.batch, self.length = batch, length
        pos = torch.arange(length, device=attention_mask.device)
        causal = pos[None, :] <= pos[:, None]                                  # [T, T] (q, k)
        valid = causal[None] & attention_mask.bool()[:, None, :]               # [B, T, T]
        eye = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
        self.masks = {}
        for window in set(windows):
            visible = valid if window is None else valid & (pos[:, None] - pos[None, :] < window)
            self.masks[window] = (visible | eye)[:, None]                      # [B, 1, T, T]
        self.windows = windows

    def __call__(self, layer, q, k, v, scale):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.masks[self.windows[layer]],
                                             scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).reshape(self.batch, self.length, -1)


class PrefillAttention(SequenceAttention):
    """The left-padded prompt [B, P], its K / V also written into the cache slots [0, P)."""

    def __init__(self, cache, attention_mask: torch.Tensor, windows):
        super().__init__(attention_mask, windows)
        self.cache = cache

    def __call__(self, layer, q, k, v, scale):
        key_cache, value_cache = self.cache.layer(layer, self.batch)
        key_cache[:, :, :self.length] = k.transpose(1, 2)
        value_cache[:, :, :self.length] = v.transpose(1, 2)
        return super().__call__(layer, q, k, v, scale)


class DecodeAttention:
    """One new token per sequence, written at slot `lengths[b]`; attention over
    [start[b], lengths[b]] (narrowed to the last `window` slots on sliding-window layers)."""

    def __init__(self, cache, kernel, lengths: torch.Tensor, start: torch.Tensor, windows):
        self.cache, self.kernel, self.lengths, self.windows = cache, kernel, lengths, windows
        self.batch = lengths.shape[0]
        self.starts = {w: start if w is None else torch.maximum(start, lengths + 1 - w)
                       for w in set(windows)}

    def inputs(self, layer):
        """(K cache, V cache, lengths, first positions) of `layer` for this step."""
        key_cache, value_cache = self.cache.layer(layer, self.batch)
        return key_cache, value_cache, self.lengths, self.starts[self.windows[layer]]

    def __call__(self, layer, q, k, v, scale):
        key_cache, value_cache, lengths, start = self.inputs(layer)
        out = self.kernel(q[:, 0].contiguous(), key_cache, value_cache, lengths,
                          k[:, 0].contiguous(), v[:, 0].contiguous(), start, scale)
        return out.reshape(self.batch, 1, -1)
