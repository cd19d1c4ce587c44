"""Decode attention in plain PyTorch: one new query token per sequence against its KV cache.

q [B, Hq, D]; k_cache, v_cache [B, Hkv, S_max, D]; cache_seqlens [B] int32 = tokens already
cached. With k_new / v_new [B, Hkv, D] they are first written at position cache_seqlens[b]
(in place) and attention covers positions [cache_start[b], cache_seqlens[b]] (the new token
included); without them it covers [cache_start[b], cache_seqlens[b]). Query head h reads KV
head h // (Hq // Hkv) (GQA / MQA). Math in float32 (float64 for float64 inputs).
"""
import math

import torch


def decode_attention(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, *,
                     cache_start=None, softmax_scale=None):
    batch, hq, dim = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(dim) if softmax_scale is None else softmax_scale
    lengths = cache_seqlens.long()
    if k_new is not None:
        rows = torch.arange(batch, device=q.device)
        k_cache[rows, :, lengths] = k_new
        v_cache[rows, :, lengths] = v_new
        lengths = lengths + 1
    start = torch.zeros_like(lengths) if cache_start is None else cache_start.long()
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = hq // hkv
    k = k_cache.to(acc).repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    v = v_cache.to(acc).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.to(acc), k) * scale
    pos = torch.arange(s_max, device=q.device)
    visible = (pos[None, :] >= start[:, None]) & (pos[None, :] < lengths[:, None])  # [B, S]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a sequence with nothing visible attends to 0
    return torch.einsum("bhs,bhsd->bhd", probs, v).to(q.dtype)


def decode_attention_kernel(q, k_cache, v_cache, cache_seqlens, k_new, v_new, cache_start,
                            softmax_scale):
    """decode_attention with the kernels' positional contract (csrc/decode.h)."""
    return decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                            cache_start=cache_start, softmax_scale=softmax_scale)
