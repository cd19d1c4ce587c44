"""fused_linear_logprobs / fused_linear_ppo_actor_loss: LM head + loss in token chunks."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import rlhf_kernels
from rlhf_kernels.ops.fused_linear import default_chunk_size
from conftest import backend_params, device_for
from logprobs_oracle import U32, logprobs64


def make(rng, n_tokens, hidden, vocab, dtype=torch.float32):
    h = torch.randn(1, n_tokens, hidden, generator=rng).to(dtype)
    w = (torch.randn(vocab, hidden, generator=rng) / hidden ** 0.5).to(dtype)
    y = torch.randint(0, vocab, (1, n_tokens), generator=rng)
    return h, w, y


def tolerance(h, w, vocab):
    """logits = h @ w.T in float32 (H-term dot products, error ~H*u*|h||w|), then the log-prob
    pass (V-term sums); grads add one more H- or N-term product."""
    scale = (h.abs().max() * w.abs().max()).item() * h.shape[-1]
    return U32 * (h.shape[-1] + vocab / 16 + 64) * (8 + 8 * scale)


@pytest.mark.parametrize("backend", backend_params("logprobs"))
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_fused_linear_logprobs_matches_float64(rng, backend, chunk):
    if backend == "triton" and not torch.cuda.is_available() and chunk == 1:
        pytest.skip("Triton interpreter (no GPU): one launch per token is slow")
    dev = device_for(backend)
    h, w, y = make(rng, 10, 16, 300)
    hd = h.to(dev).detach().clone().requires_grad_()
    wd = w.to(dev).detach().clone().requires_grad_()
    logp, ent = rlhf_kernels.fused_linear_logprobs(hd, wd, y.to(dev), temperature=0.9,
                                                   return_entropy=True, chunk_size=chunk,
                                                   backend=backend)
    g1 = torch.randn(logp.shape, generator=rng)
    g2 = torch.randn(logp.shape, generator=rng)
    ((logp * g1.to(dev)).sum() + (ent * g2.to(dev)).sum()).backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref_logp, ref_ent = logprobs64(h64 @ w64.t(), y, 0.9)
    ((ref_logp * g1.double()).sum() + (ref_ent * g2.double()).sum()).backward()
    tol = tolerance(h, w, 300)
    torch.testing.assert_close(logp.cpu().double(), ref_logp.detach(), rtol=0, atol=tol)
    torch.testing.assert_close(ent.cpu().double(), ref_ent.detach(), rtol=0, atol=tol)
    for got, want in ((hd.grad, h64.grad), (wd.grad, w64.grad)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=0,
                                   atol=tol * (1 + want.abs().max().item()) * 10)


@pytest.mark.parametrize("live", ["holes", "entropy-only-row", "none"])
def test_backward_computes_only_rows_with_gradient(rng, live, monkeypatch):
    """Masked outputs (TRL scores every position and zeroes the padding's gradient): the
    backward recomputes only the rows whose gradient is nonzero; the result is the float64
    one, with exact zeros in the skipped rows of grad_hidden."""
    import rlhf_kernels.ops.fused_linear as fused_linear
    seen = []
    original = fused_linear.fused_linear_logprobs_bwd

    def counted(hidden, *args):
        seen.append(hidden.shape[0])
        return original(hidden, *args)
    monkeypatch.setattr(fused_linear, "fused_linear_logprobs_bwd", counted)
    h, w, y = make(rng, 12, 16, 301)
    g1 = torch.randn(12, generator=rng)
    g2 = torch.zeros(12)
    g1[[0, 3, 4, 11]] = 0  # holes, both ends
    if live == "entropy-only-row":
        g2[3] = 0.5
    if live == "none":
        g1.zero_()
    hd, wd = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent = rlhf_kernels.fused_linear_logprobs(hd, wd, y, return_entropy=True,
                                                   chunk_size=5, backend="cpu")
    ((logp * g1).sum() + (ent * g2).sum()).backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref_logp, ref_ent = logprobs64(h64 @ w64.t(), y, 1.0)
    ((ref_logp * g1.double()).sum() + (ref_ent * g2.double()).sum()).backward()
    assert seen == [int(((g1 != 0) | (g2 != 0)).sum())]
    tol = tolerance(h, w, 301)
    for got, want in ((hd.grad, h64.grad), (wd.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0,
                                   atol=tol * (1 + want.abs().max().item()) * 10)
    dead = (g1 == 0) & (g2 == 0)
    assert torch.equal(hd.grad[0][dead], torch.zeros_like(hd.grad[0][dead]))


@pytest.mark.parametrize("backend", backend_params("logprobs"))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
def test_fused_linear_ppo_equals_unfused(rng, backend, agg):
    dev = device_for(backend)
    B, T, H, V = 2, 6, 16, 200
    h = torch.randn(B, T, H, generator=rng)
    w = torch.randn(V, H, generator=rng) / 4
    y = torch.randint(0, V, (B, T), generator=rng)
    mask = torch.rand(B, T, generator=rng) > 0.3
    mask[0, 0] = True
    old = torch.randn(B, T, generator=rng) - 5
    adv = torch.randn(B, T, generator=rng)
    ref = torch.randn(B, T, generator=rng) - 5
    kw = dict(ref_logprobs=ref.to(dev), kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0,
              agg=agg, backend=backend)
    outs = []
    for fused in (True, False):
        hd = h.to(dev).detach().clone().requires_grad_()
        wd = w.to(dev).detach().clone().requires_grad_()
        args = (y.to(dev), old.to(dev), adv.to(dev), mask.to(dev))
        if fused:
            out = rlhf_kernels.fused_linear_ppo_actor_loss(hd, wd, *args, chunk_size=5, **kw)
        else:
            out = rlhf_kernels.ppo_actor_loss(hd @ wd.t(), *args, **kw)
        out.loss.backward()
        outs.append((out, hd.grad, wd.grad))
    (a, ha, wa), (b, hb, wb) = outs
    # same kernels on the same logits, up to the matmul's summation order: float32 ulps
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ha, hb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-6)


def test_fused_linear_never_holds_full_logits(rng):
    n, H, V = 256, 32, 4000
    h, w, y = make(rng, n, H, V, torch.bfloat16)
    h.requires_grad_()
    w.requires_grad_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logp = rlhf_kernels.fused_linear_logprobs(h, w, y, chunk_size=32, backend="cpu")
        logp.sum().backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    full_logits = n * V * 2
    # the float32 grad-weight accumulator [V, H] is the largest buffer; logits come 32 rows
    # at a time
    assert biggest <= max(V * H * 4, 32 * V * 2) + 1024
    assert biggest < full_logits


def test_default_chunk_size():
    assert default_chunk_size(4096, 4096, 128000) == 256
    assert default_chunk_size(10, 16, 300) == 10
    assert default_chunk_size(100000, 896, 151936) == 1024


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(w_shape=(50, 8)), ValueError, "weight must be"),
    (dict(w_dtype=torch.float64), TypeError, "weight dtype"),
    (dict(label=50), ValueError, r"labels must be in \[0, 50\)"),
    (dict(chunk_size=0), ValueError, "chunk_size must be"),
])
def test_fused_linear_bad_input(kwargs, error, match):
    h = torch.randn(1, 4, 16)
    w = torch.randn(*kwargs.pop("w_shape", (50, 16))).to(kwargs.pop("w_dtype", torch.float32))
    y = torch.zeros(1, 4, dtype=torch.long)
    y[0, 1] = kwargs.pop("label", 0)
    with pytest.raises(error, match=match):
        rlhf_kernels.fused_linear_logprobs(h, w, y, **kwargs)
