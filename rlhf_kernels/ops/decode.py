"""Decode attention and sampling: checks and dispatch (contract in csrc/decode.h).

    decode_attention(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, *,
                     cache_start=None, softmax_scale=None, backend="auto") -> out [B, Hq, D]
    sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, generator=None, backend="auto")
        -> (tokens [B] int64, logprobs [B] float32)

These public entry points check values (lengths within the cache...), which costs a host sync
on GPU; the generation loop calls the kernels directly with tensors it built itself. Non-finite
logits follow the rule in rlhf_kernels/reference/sample.py: `sample` raises ValueError naming
the rows that hold NaN (or are -inf everywhere); the kernels only mark them (token < 0).
"""
from __future__ import annotations

import math

import torch

from .. import _backends
from ..reference import decode_attention as ref_attention
from ..reference import sample as ref_sample
from . import _checks

CUDA_HEAD_DIMS = (64, 80, 96, 128, 256)  # csrc/cuda/decode.cu instantiates these


def _int_vector(name, x, batch, device):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got {x.dtype}")
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")
    return x.to(torch.int32).contiguous()


def _kernel(op, name):
    if name == "triton":
        import importlib
        return getattr(importlib.import_module(f"rlhf_kernels.triton.{op}"), op)
    ext, _ = _backends.extension()
    return getattr(ext, f"{op}_{name}")


def decode_attention(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, *,
                     cache_start=None, softmax_scale=None, backend="auto"):
    # the length checks below read values: meta tensors have none
    _checks.real_tensors("decode_attention", q=q, k_cache=k_cache, v_cache=v_cache,
                         cache_seqlens=cache_seqlens, k_new=k_new, v_new=v_new,
                         cache_start=cache_start)
    q = _checks.float_tensor("q", q)
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    batch, hq, dim = q.shape
    if batch == 0:
        raise ValueError("q is empty: the batch has no sequence")
    if dim == 0:  # the default scale 1 / sqrt(D) would divide by zero
        raise ValueError(f"q has head dim D = 0 (shape {tuple(q.shape)}): attention needs D >= 1")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.float_tensor(name, cache)
        if cache.dim() != 4 or cache.shape[0] != batch or cache.shape[3] != dim:
            raise ValueError(f"{name} must be [B={batch}, Hkv, S, D={dim}], got "
                             f"{tuple(cache.shape)}")
        if cache.dtype != q.dtype:
            raise TypeError(f"{name} dtype {cache.dtype} differs from q dtype {q.dtype}")
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous (new tokens are written into it)")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache "
                         f"{tuple(k_cache.shape)}")
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    if hkv == 0:
        raise ValueError(f"k_cache has no KV head (shape {tuple(k_cache.shape)})")
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of the cache's KV heads ({hkv})")
    device = _checks.same_device(q=q, k_cache=k_cache, v_cache=v_cache)
    lengths = _int_vector("cache_seqlens", cache_seqlens, batch, device)
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    if k_new is not None:
        for name, new in (("k_new", k_new), ("v_new", v_new)):
            _checks.float_tensor(name, new)
            if new.shape != (batch, hkv, dim) or new.dtype != q.dtype:
                raise ValueError(f"{name} must be [{batch}, {hkv}, {dim}] of dtype {q.dtype}, "
                                 f"got {tuple(new.shape)} {new.dtype}")
        k_new, v_new = k_new.to(device).contiguous(), v_new.to(device).contiguous()
    room = s_max - 1 if k_new is not None else s_max
    host = lengths.cpu()
    if bool(((host < 0) | (host > room)).any()):
        raise ValueError(f"cache_seqlens must be in [0, {room}] (cache of {s_max} positions"
                         f"{', one kept for the new token' if k_new is not None else ''}), got "
                         f"{host.tolist()}")
    if cache_start is not None:
        cache_start = _int_vector("cache_start", cache_start, batch, device)
        if bool((cache_start.cpu() < 0).any()):
            raise ValueError("cache_start must be >= 0")
    scale = (1.0 / math.sqrt(dim) if softmax_scale is None
             else _checks.number("softmax_scale", softmax_scale, finite=True))
    kernel = attention_kernel(backend, device, dim)
    return kernel(q.contiguous(), k_cache, v_cache, lengths, k_new, v_new, cache_start, scale)


def attention_kernel(backend, device, head_dim):
    """The decode attention kernel `backend` resolves to on `device`, with no value checks:
    f(q, k_cache, v_cache, cache_seqlens, k_new, v_new, cache_start, scale) -> out. The
    generation loop calls it on tensors it built itself (no host sync)."""
    name = _backends.resolve("decode_attention", backend, device)
    if name == "cuda" and head_dim not in CUDA_HEAD_DIMS:
        if backend == "cuda":
            raise ValueError(f"the CUDA decode kernel supports head dims {CUDA_HEAD_DIMS}, got "
                             f"{head_dim}; use backend='triton' or 'torch'")
        name = "triton" if _backends.kernel_status("decode_attention", "triton")[0] else "torch"
    if name == "torch":
        def torch_attention(q, k_cache, v_cache, lengths, k_new, v_new, start, scale):
            return ref_attention.decode_attention(q, k_cache, v_cache, lengths, k_new, v_new,
                                                  cache_start=start, softmax_scale=scale)
        return torch_attention
    kernel = _kernel("decode_attention", name)
    if name != "cuda":
        return kernel

    def cuda_attention(q, k_cache, v_cache, lengths, k_new, v_new, start, scale):
        # 16-byte loads: realign views that start mid-vector (the caches cannot move)
        q, k_new, v_new = (x if x is None or x.data_ptr() % 16 == 0 else x.clone()
                           for x in (q, k_new, v_new))
        return kernel(q, k_cache, v_cache, lengths, k_new, v_new, start, scale)
    return cuda_attention


def sample_kernel(backend, device):
    """The sampling kernel for temperature > 0, with no value checks:
    f(logits, temperature, top_k, top_p, uniforms) -> (tokens, logprobs)."""
    name = _backends.resolve("sample", backend, device)
    if name == "torch":
        def torch_sample(logits, temperature, top_k, top_p, uniforms):
            return ref_sample.sample(logits, temperature, top_k, top_p, uniforms=uniforms)
        return torch_sample
    kernel = _kernel("sample", name)
    return lambda logits, *args: kernel(logits.contiguous(), *args)


def check_sampling(temperature, top_k, top_p):
    """Validated (temperature, top_k, top_p) as (float, int, float)."""
    temperature = _checks.number("temperature", temperature)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    top_k_value = _checks.number("top_k", top_k)
    if int(top_k_value) != top_k_value or top_k_value < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    top_p = _checks.number("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return temperature, int(top_k_value), top_p


def raise_for_error_rows(tokens, what="logits row(s)"):
    """NonFiniteLogitsError (a ValueError) naming the error rows (NaN, or -inf everywhere) the
    sampler marked in `tokens`; one host sync."""
    if bool((tokens < 0).any()):
        raise ref_sample.NonFiniteLogitsError(f"sample: {ref_sample.row_errors(tokens, what)}")


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, generator=None, backend="auto"):
    logits = _checks.float_tensor("logits", logits)
    if logits.dim() != 2 or logits.numel() == 0:
        raise ValueError(f"logits must be a non-empty [B, V], got shape {tuple(logits.shape)}")
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    if logits.is_meta:
        # no data, so no kernel and no row check; the torch reference gives the shapes
        if backend not in ("auto", "torch"):
            _checks.real_tensors(f"sample (backend={backend!r})", logits=logits)
        return ref_sample.sample(logits, temperature, top_k, top_p)
    if temperature == 0:  # greedy: no kernel needed
        tokens, logp = ref_sample.greedy(logits)
    else:
        uniforms = ref_sample.draw_uniforms(logits.shape[0], generator, logits.device)
        tokens, logp = sample_kernel(backend, logits.device)(logits, temperature, top_k, top_p,
                                                             uniforms)
    raise_for_error_rows(tokens)
    return tokens, logp
