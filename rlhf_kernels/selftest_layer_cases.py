"""The selftest's cases for the generation ops (decode attention, sampling) and the decoder-layer
ops (RMSNorm, RoPE, SwiGLU); see selftest_cases for the Check / Setup they use."""
from __future__ import annotations

import torch

import rlhf_kernels

from . import selftest_tolerances as tol
from .ops.rms_norm import rms_norm
from .ops.rope import rotate
from .ops.swiglu import swiglu
from .reference import decode_attention as ref_attention
from .reference import rms_norm as ref_rms_norm
from .reference import rope as ref_rope
from .reference import sample as ref_sample
from .reference import swiglu as ref_swiglu
from .selftest_cases import Setup, compare, exact

SAMPLE_SETTINGS = ((0, 1.0), (1, 1.0), (5, 0.9), (0, 0.3))  # (top_k, top_p)
# the Triton interpreter runs each filter's 32 bisection passes row by row: fewer of both
SAMPLE_SETTINGS_TINY = ((0, 1.0), (5, 0.9))
SAMPLE_TEMPERATURE = 0.8


def decode_case(s: Setup):
    # head dim 64: one the CUDA kernel instantiates (CUDA_HEAD_DIMS); 16 under the interpreter
    batch, hq, hkv, dim, s_max = 3, 4, 2, (16 if s.tiny else 64), (17 if s.tiny else 100)
    checks = []
    for append in (False, True):
        q = s.randn(batch, hq, dim)
        k, v = s.randn(batch, hkv, s_max, dim), s.randn(batch, hkv, s_max, dim)
        room = s_max - 1 if append else s_max
        lengths = torch.randint(0, room + 1, (batch,), generator=s.gen, dtype=torch.int32)
        lengths[0] = room  # a full cache
        start = torch.randint(0, 3, (batch,), generator=s.gen, dtype=torch.int32)
        start[1] = s_max  # nothing visible: the output is 0
        new = (s.randn(batch, hkv, dim), s.randn(batch, hkv, dim)) if append else (None, None)
        kd, vd = k.to(s.device), v.to(s.device)
        out = rlhf_kernels.decode_attention(
            q.to(s.device), kd, vd, lengths.to(s.device),
            *(None if x is None else x.to(s.device) for x in new),
            cache_start=start.to(s.device), backend=s.backend)
        k64, v64 = k.double(), v.double()  # the reference appends to these in place
        want = ref_attention.decode_attention(
            q.double(), k64, v64, lengths, *(None if x is None else x.double() for x in new),
            cache_start=start)
        what = "append" if append else "no append"
        checks += [compare(f"{what}: output", out, want,
                           tol.decode_attention(want, dim, s_max, s.dtype, s.truncating)),
                   exact(f"{what}: KV cache", (kd.cpu() != k64.to(s.dtype)).sum()
                         + (vd.cpu() != v64.to(s.dtype)).sum())]
    return checks


def sample_case(s: Setup):
    """Exact: the drawn token is in the reference's kept set (top-k ties kept, top-p mass), so
    top_k=1 is the argmax. Up to float32 rounding: its log-prob, and u inside the token's
    interval of the kept cdf (tokens may differ from the reference's only at a boundary)."""
    batch, vocab = (2, 37) if s.tiny else (4, 1000)
    logits = s.randn(batch, vocab, scale=3.0)
    logits[-1, :4] = logits[-1].max()  # ties at the top
    z = logits.float() / SAMPLE_TEMPERATURE
    checks = []
    for seed, (top_k, top_p) in enumerate(SAMPLE_SETTINGS_TINY if s.tiny else SAMPLE_SETTINGS):
        tokens, logp = rlhf_kernels.sample(
            logits.to(s.device), temperature=SAMPLE_TEMPERATURE, top_k=top_k, top_p=top_p,
            generator=torch.Generator().manual_seed(seed), backend=s.backend)
        u = ref_sample.draw_uniforms(batch, torch.Generator().manual_seed(seed), "cpu")
        tokens = tokens.cpu()
        keep = ref_sample.kept_mask(z, top_k, top_p)
        what = f"top_k={top_k} top_p={top_p}"
        checks.append(exact(f"{what}: tokens outside the kept set",
                            (~keep.gather(-1, tokens[:, None])).sum()))
        want = torch.log_softmax(z.double(), -1).gather(-1, tokens[:, None])[:, 0]
        checks.append(compare(f"{what}: logprob", logp, want,
                              tol.logprobs_fwd(logits, SAMPLE_TEMPERATURE)))
        probs = torch.where(keep, torch.softmax(z, -1), 0.0).double()
        probs = probs / probs.sum(-1, keepdim=True)
        hi = probs.cumsum(-1).gather(-1, tokens[:, None])[:, 0]
        lo = hi - probs.gather(-1, tokens[:, None])[:, 0]
        outside = torch.maximum(lo - u.double(), u.double() - hi).clamp(min=0)
        checks.append(compare(f"{what}: u outside the token's cdf interval", outside,
                              torch.zeros_like(outside), tol.sample_cdf_slack(vocab)))
    return checks


def rms_norm_case(s: Setup):
    shape, eps = (2, 3, 37), 1e-6  # H = 37: vector tails
    x, w, dy = s.randn(*shape, scale=3.0), s.randn(shape[-1]), s.randn(*shape)
    xd, wd = s.leaf(x), s.leaf(w)
    y = rms_norm(xd, wd, eps, backend=s.backend)
    dx, dw = torch.autograd.grad(y, (xd, wd), dy.to(s.device))
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    want = ref_rms_norm.rms_norm(x64, w64, eps)
    want_dx, want_dw = torch.autograd.grad(want, (x64, w64), dy.double())
    r = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    rows = x.numel() // shape[-1]
    return [compare("output", y, want, tol.rms_norm_fwd(want, shape[-1])),
            compare("grad x", dx, want_dx,
                    tol.rms_norm_grad(rows, shape[-1], dy.double() * w.double() * r)),
            compare("grad weight", dw, want_dw,
                    tol.rms_norm_grad(rows, shape[-1], dy.double() * x.double() * r))]


def rope_tables(s: Setup, batch: int, length: int, dim: int):
    """Hugging Face style tables at random positions (left padding gives any position)."""
    positions = torch.randint(0, 500, (batch, length), generator=s.gen).float()
    inv_freq = 10000.0 ** -(torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return ref_rope.rope_tables(emb.cos().to(s.dtype), emb.sin().to(s.dtype))


def rope_case(s: Setup):
    shape = (2, 5, 3, 24)  # 3 heads, half-dim 12: vector tails
    x, dy = s.randn(*shape), s.randn(*shape)
    cos, sin = rope_tables(s, shape[0], shape[1], shape[3])
    xd = s.leaf(x)
    y = rotate(xd, cos.to(s.device), sin.to(s.device), backend=s.backend)
    (dx,) = torch.autograd.grad(y, xd, dy.to(s.device))
    x64 = x.double().requires_grad_()
    want = ref_rope.rotate(x64, cos.double(), sin.double())
    (want_dx,) = torch.autograd.grad(want, x64, dy.double())
    return [compare("output", y, want, tol.rope(x)),
            compare("grad x", dx, want_dx, tol.rope(dy))]


def swiglu_case(s: Setup):
    shape = (3, 37)
    gate, up, dy = s.randn(*shape, scale=6.0), s.randn(*shape), s.randn(*shape)
    gate.view(-1)[:3] = torch.tensor([-100.0, 0.0, 100.0])  # the activation's whole range
    gd, ud = s.leaf(gate), s.leaf(up)
    y = swiglu(gd, ud, backend=s.backend)
    d_gate, d_up = torch.autograd.grad(y, (gd, ud), dy.to(s.device))
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    want = ref_swiglu.swiglu(g64, u64)
    want_gate, want_up = torch.autograd.grad(want, (g64, u64), dy.double())
    g, u, d = gate.double(), up.double(), dy.double()
    return [compare("output", y, want, tol.swiglu(g * u)),
            compare("grad gate", d_gate, want_gate, tol.swiglu(d * u * (1 + g.abs()))),
            compare("grad up", d_up, want_up, tol.swiglu(d * g))]
