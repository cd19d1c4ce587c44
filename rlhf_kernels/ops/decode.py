"""Decode attention and sampling: checks and dispatch (contract in csrc/decode.h).

    decode_attention(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, *,
                     cache_start=None, softmax_scale=None, backend="auto") -> out [B, Hq, D]
    sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, generator=None, backend="auto")
        -> (tokens [B] int64, logprobs [B] float32)

These public entry points check values (lengths within the cache...), which costs a host sync
on GPU, then call the custom ops rlhf_kernels::decode_attention (declared to mutate the caches:
k_new / v_new are appended in place) and rlhf_kernels::sample; the generation loop calls the
kernels of the table directly (attention_kernel, sample_kernel) with tensors it built itself:
no host sync and no dispatcher cost in a step, which stays CUDA-graph capturable. Non-finite
logits follow the rule in rlhf_kernels/reference/sample.py: `sample` raises ValueError naming
the rows that hold NaN (or are -inf everywhere); the kernels only mark them (token < 0).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backends
from ..reference import sample as ref_sample
from . import _checks

CUDA_HEAD_DIMS = _backends.DECODE_CUDA_HEAD_DIMS


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
    name = _checks.choose("decode_attention", backend, device, q.dtype, dim)
    return decode_attention_op(q.contiguous(), k_cache, v_cache, lengths, k_new, v_new,
                               cache_start, scale, name)


@torch.library.custom_op("rlhf_kernels::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                        k_new: Optional[Tensor], v_new: Optional[Tensor],
                        cache_start: Optional[Tensor], softmax_scale: float,
                        backend: str) -> Tensor:
    """The kernels' contract (csrc/decode.h); with k_new / v_new the caches are written."""
    (run,) = _backends.kernel("decode_attention", backend)
    return run(q, k_cache, v_cache, cache_seqlens, k_new, v_new, cache_start, softmax_scale)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, cache_start, softmax_scale, backend):
    return torch.empty_like(q)


def attention_kernel(backend, device, head_dim, dtype=None):
    """The decode attention kernel `backend` resolves to on `device`, with no value checks:
    f(q, k_cache, v_cache, cache_seqlens, k_new, v_new, cache_start, scale) -> out. The
    generation loop calls it on tensors it built itself (no host sync, no dispatcher)."""
    name = _backends.choose("decode_attention", backend, device, dtype, head_dim)
    return _backends.kernel("decode_attention", name)[0]


def realign_16_bytes(kernel):
    """The CUDA kernel's 16-byte loads: views that start mid-vector are realigned (cloned;
    the caches, written in place, are contiguous allocations)."""
    def aligned(q, k_cache, v_cache, lengths, k_new, v_new, start, scale):
        q, k_new, v_new = (x if x is None or x.data_ptr() % 16 == 0 else x.clone()
                           for x in (q, k_new, v_new))
        return kernel(q, k_cache, v_cache, lengths, k_new, v_new, start, scale)
    return (aligned,)


def torch_sample(logits, temperature, top_k, top_p, uniforms):
    """The torch reference with the sampling kernels' contract (csrc/decode.h)."""
    return ref_sample.sample(logits, temperature, top_k, top_p, uniforms=uniforms)


def sample_kernel(backend, device, dtype=None):
    """The sampling kernel for temperature > 0, with no value checks:
    f(logits, temperature, top_k, top_p, uniforms) -> (tokens, logprobs)."""
    name = _backends.choose("sample", backend, device, dtype)
    (kernel,) = _backends.kernel("sample", name)
    return lambda logits, *args: kernel(logits.contiguous(), *args)


@torch.library.custom_op("rlhf_kernels::sample", mutates_args=())
def sample_op(logits: Tensor, temperature: float, top_k: int, top_p: float, uniforms: Tensor,
              backend: str) -> tuple[Tensor, Tensor]:
    """(tokens [B] int64, logprobs [B] float32); error rows marked, not raised (csrc/decode.h)."""
    (run,) = _backends.kernel("sample", backend)
    return run(logits.contiguous(), temperature, top_k, top_p, uniforms)


@sample_op.register_fake
def _(logits, temperature, top_k, top_p, uniforms, backend):
    rows = logits.shape[:1]
    return logits.new_empty(rows, dtype=torch.int64), logits.new_empty(rows, dtype=torch.float32)


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
        name = _checks.choose("sample", backend, logits.device, logits.dtype)
        tokens, logp = sample_op(logits, temperature, top_k, top_p, uniforms, name)
    raise_for_error_rows(tokens)
    return tokens, logp
