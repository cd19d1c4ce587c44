"""Triton log-probs / entropy kernels (launchers in rlhf_kernels.triton.logprobs) against float64.

The reference sees exactly the values the kernel sees (the logits after the cast to their dtype)
and does everything in float64, so the differences are the kernels' float32 rounding (and, for
the gradients, the final rounding to the logits dtype); the tolerances below bound those.
"""
import pytest
import torch

from rlhf_kernels._backends import triton_interpret

from conftest import TRITON_DEVICE, TRITON_KERNEL_MARKS  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed")
from rlhf_kernels.triton import logprobs as lpk  # noqa: E402

pytestmark = TRITON_KERNEL_MARKS
DEV = TRITON_DEVICE
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = 2.0 ** -24
# half an ulp, relative, of the gradient's storage dtype; the absolute term is fp16's half
# subnormal spacing (tiny p_j make tiny gradients). The interpreter truncates float32 -> bfloat16
# (its cast_impl passes no rounding mode) where GPUs round to nearest: a whole ulp there.
ROUND = {torch.float32: (0.0, 0.0),
         torch.bfloat16: (2.0 ** (-7 if triton_interpret() else -8), 0.0),
         torch.float16: (2.0 ** -11, 2.0 ** -25)}


def make_logits(rng, B, T, V, dtype, extra_t=0):
    return (3 * torch.randn(B, T + extra_t, V, generator=rng)).to(dtype).to(DEV)


def make_labels(rng, B, T, V):
    labels = torch.randint(0, V, (B, T), generator=rng)
    labels.view(-1)[0] = V - 1  # the last column: the tail of the last chunk
    return labels.to(DEV)


def reference(logits, labels, inv_t, g_logp, g_ent):
    """float64 logp, entropy, lse and d(g_logp . logp + g_ent . entropy)/d(logits)."""
    x = logits.detach().double().cpu().requires_grad_()
    logp_all = torch.log_softmax(x * inv_t, dim=-1)
    logp = logp_all.gather(-1, labels.cpu().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    # p log p = 0 where p = 0 (masked -inf logits): 0 * -inf would be NaN, in autograd too
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    loss = (g_logp.double().cpu() * logp).sum()
    if g_ent is not None:
        loss = loss + (g_ent.double().cpu() * entropy).sum()
    (grad,) = torch.autograd.grad(loss, x)
    lse = torch.logsumexp(x.detach() * inv_t, dim=-1)
    return logp.detach(), entropy.detach(), lse, grad


def scale_of(logits, inv_t, ref_lse):
    z = logits.double().cpu() * inv_t
    return max(1.0, ref_lse.abs().max().item(), z[torch.isfinite(z)].abs().max().item())


def check(logits, labels, inv_t, rng, ent_grad=True, grad_out=None):
    """Forward with and without entropy, then backward into grad_out (a fresh tensor by
    default; the test passes logits itself or a strided view for the in-place cases)."""
    B, T, V = logits.shape
    x_ref = logits.detach().clone()  # before an in-place backward overwrites it
    g_logp = torch.randn(B, T, generator=rng).to(DEV)
    g_ent = torch.randn(B, T, generator=rng).to(DEV) if ent_grad else None
    r_logp, r_ent, r_lse, r_grad = reference(x_ref, labels, inv_t, g_logp, g_ent)
    scale = scale_of(x_ref, inv_t, r_lse)

    logp, ent, lse = lpk.logprobs_fwd(logits, labels, inv_t, True)
    logp2, ent2, lse2 = lpk.logprobs_fwd(logits, labels, inv_t, False)
    assert ent2.numel() == 0
    assert torch.equal(logp2, logp) and torch.equal(lse2, lse)
    for out in (logp, ent, lse):
        assert out.dtype == torch.float32 and out.shape == (B, T)
    # fp32 forward: z_j = x_j * inv_t rounds to eps * |z| (inv_t itself is passed as fp32, one
    # more eps * |z|); s sums up to V positive terms (tree within a chunk, sequential across
    # chunks) to a relative error of (log2 BLOCK_V + V / BLOCK_V) * eps, < 20 eps here; the
    # entropy subtracts t / s (|t / s| <= max |z|) from lse. So every error is a few tens of
    # eps times the largest of |lse|, |z|: 1e-5 (~170 eps) of that is a safe, still tight bound.
    tol = 1e-5 * scale
    torch.testing.assert_close(lse.double().cpu(), r_lse, rtol=0, atol=tol)
    torch.testing.assert_close(logp.double().cpu(), r_logp, rtol=0, atol=tol)
    torch.testing.assert_close(ent.double().cpu(), r_ent, rtol=0, atol=tol)

    if grad_out is None:
        grad_out = torch.empty_like(logits)
    lpk.logprobs_bwd(logits, labels, lse, ent if ent_grad else None, g_logp, g_ent, inv_t,
                     grad_out)
    # fp32 backward: p_j = exp(z_j - lse) inherits the absolute error of z_j - lse (<= tol
    # above) as a relative one, and z_j - lse + entropy = z_j - E z carries up to twice that, so
    # |grad_z_j error| <= tol * p_j * (|g_logp| + |g_ent| (2 + |z_j - E z|)), plus the last
    # float32 roundings of grad_z_j and of grad_z_j * inv_t; times inv_t for grad_logits.
    z = x_ref.double().cpu() * inv_t
    p = torch.softmax(z, dim=-1)
    zc = torch.where(p > 0, z - (p * torch.where(p > 0, z, 0.0)).sum(-1, keepdim=True), 0.0)
    w = g_logp.abs().double().cpu().unsqueeze(-1)
    if ent_grad:
        w = w + g_ent.abs().double().cpu().unsqueeze(-1) * (2 + zc.abs())
    tol32 = tol * inv_t * p * w + 4 * EPS32 * r_grad.abs()
    rel, floor = ROUND[logits.dtype]
    got = grad_out.double().cpu()
    err = (got - r_grad).abs()
    bound = tol32 + rel * (r_grad.abs() + tol32) + floor
    assert torch.isfinite(got).all()
    assert (err <= bound).all(), (f"max err {err.max().item():.3g}, "
                                  f"worst err/bound {(err / bound).max().item():.3g}")


@pytest.mark.parametrize("inv_t", [1.0, 1 / 0.7], ids=["T=1", "T=0.7"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 1000, 5000])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 3)])
def test_matches_float64(rng, B, T, V, dtype, inv_t):
    logits = make_logits(rng, B, T, V, dtype)
    labels = make_labels(rng, B, T, V)
    check(logits, labels, inv_t, rng, ent_grad=True)
    check(logits, labels, inv_t, rng, ent_grad=False)


@pytest.mark.parametrize("V", [1000, 5000])
def test_many_chunks(rng, monkeypatch, V):
    # 256-wide chunks: 4 and 20 loop steps, the max grows across chunks
    monkeypatch.setattr(lpk, "MAX_BLOCK_V", 256)
    logits = make_logits(rng, 2, 3, V, torch.float32)
    logits[0, 0] += torch.linspace(0, 20, V, device=DEV)  # the max is in the last chunk
    check(logits, make_labels(rng, 2, 3, V), 1 / 0.7, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_logits(rng, dtype):
    full = make_logits(rng, 2, 3, 1000, dtype, extra_t=1)
    labels = make_labels(rng, 2, 3, 1000)
    check(full[:, :-1], labels, 1.0, rng)  # the shifted view every trainer uses: no copy
    # B and T strides in the other order, and a strided gradient buffer
    tb = make_logits(rng, 3, 2, 1000, dtype).transpose(0, 1)
    buf = torch.full((2, 4, 1000), 7.0, dtype=dtype, device=DEV)
    check(tb, labels, 1 / 0.7, rng, grad_out=buf[:, :3])
    assert (buf[:, 3] == 7).all()  # the row past the view is untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward(rng, dtype):
    full = make_logits(rng, 2, 3, 5000, dtype, extra_t=1)
    last = full[:, -1].clone()
    view = full[:, :-1]
    check(view, make_labels(rng, 2, 3, 5000), 1 / 0.7, rng, grad_out=view)
    assert torch.equal(full[:, -1], last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_neg_inf_logits(rng, monkeypatch, dtype):
    monkeypatch.setattr(lpk, "MAX_BLOCK_V", 256)
    V = 1000
    logits = make_logits(rng, 2, 3, V, dtype)
    logits[0, 0, :300] = float("-inf")  # the whole first chunk and part of the second
    logits[0, 1, 1::3] = float("-inf")
    logits[1, 2, :-1] = float("-inf")  # a single finite logit: p = 1 there, entropy 0
    labels = make_labels(rng, 2, 3, V)
    labels[1, 2] = V - 1
    check(logits, labels, 1 / 0.7, rng)
    check(logits, labels, 1.0, rng, ent_grad=False)
