"""ppo_actor_loss / ppo_critic_loss: every backend against a float64 oracle."""
import itertools
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import rlhf_kernels
from rlhf_kernels._backends import triton_interpret
from conftest import backend_params, device_for
from logprobs_oracle import fwd_tolerance, grad_tolerance, logprobs64

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def oracle_actor(logits, labels, old, adv, mask, ref, *, clip_low=0.2, clip_high=0.2,
                 dual_clip=None, kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0,
                 temperature=1.0, agg="token-mean", ratio_clamp=20.0):
    """The contract's formulas in float64, token by token, aggregation row by row."""
    logp, ent = logprobs64(logits, labels, temperature)
    ratio = torch.exp(torch.clamp(logp - old, -ratio_clamp, ratio_clamp))
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    loss = pg - entropy_coef * ent
    if ref is not None:
        d = ref - logp
        kl = {"k1": -d, "k2": 0.5 * d * d, "k3": torch.exp(d) - d - 1}[kl_estimator]
        loss = loss + kl_coef * kl
    rows = []
    batch, length = loss.shape
    for b in range(batch):
        valid = loss[b][mask[b]]
        rows.append((valid.sum(), valid.numel()))
    total = sum(s for s, _ in rows)
    count = sum(n for _, n in rows)
    if agg == "token-mean":
        return total / max(count, 1), logp, ent, ratio
    if agg == "seq-mean-token-mean":
        return sum(s / max(n, 1) for s, n in rows) / batch, logp, ent, ratio
    if agg == "seq-mean-token-sum":
        return total / batch, logp, ent, ratio
    return total / (batch * length), logp, ent, ratio


def make_batch(rng, batch, length, vocab, dtype=torch.float32, temperature=1.0):
    x = (torch.randn(batch, length, vocab, generator=rng) * 2).to(dtype)
    y = torch.randint(0, vocab, (batch, length), generator=rng)
    mask = torch.rand(batch, length, generator=rng) > 0.25
    mask[0, 0] = True  # at least one valid token
    if batch >= 3:
        mask[2] = False  # a row with no valid token
    true_logp, _ = logprobs64(x, y, temperature)  # the log-probs the loss will see
    log_ratio = 0.3 * torch.randn(batch, length, generator=rng, dtype=torch.float64)
    # keep ratios off the kinks of the clipped objective (r = 0.8, 1.2, dual clip 3): there the
    # gradient jumps, and float32 rounding of logp may pick either side
    for kink in (math.log(0.8), math.log(1.2), math.log(3.0)):
        near = (log_ratio - kink).abs() < 1e-3
        log_ratio = torch.where(near, kink + 2e-3 * torch.sign(log_ratio - kink + 1e-12),
                                log_ratio)
    old = (true_logp - log_ratio).float()
    ref = (true_logp + 0.3 * torch.randn(batch, length, generator=rng)).float()
    adv = torch.randn(batch, length, generator=rng)
    y[~mask] = vocab + 5  # labels under mask = 0 are padding: never checked nor read
    return x, y, old, adv, mask, ref


def run_and_compare(backend, x, y, old, adv, mask, ref, **opts):
    dev = device_for(backend)
    xd = x.to(dev).detach().clone().requires_grad_()
    out = rlhf_kernels.ppo_actor_loss(xd, y.to(dev), old.to(dev), adv.to(dev), mask.to(dev),
                                      ref_logprobs=ref.to(dev), backend=backend, **opts)
    out.loss.backward()
    x64 = x.detach().double().requires_grad_()
    y_safe = torch.where(mask, y, 0)
    ref_loss, logp, ent, ratio = oracle_actor(x64, y_safe, old.double(), adv.double(), mask,
                                              ref.double(), **opts)
    ref_loss.backward()
    tol = fwd_tolerance(x, opts.get("temperature", 1.0), x.shape[-1])
    # |d loss / d logp| <= |A| r + kl_coef * (1 + e^|d|) + entropy_coef per token, r <= 1.2
    lip = 1.2 * adv.abs().max().item() + 4 * opts.get("kl_coef", 0) + 1
    torch.testing.assert_close(out.loss.detach().cpu().double(), ref_loss.detach(), rtol=0,
                               atol=lip * tol)
    m = mask
    torch.testing.assert_close(out.logprobs.cpu().double(), torch.where(m, logp, 0).detach(),
                               rtol=0, atol=tol)
    torch.testing.assert_close(out.entropy.cpu().double(), torch.where(m, ent, 0).detach(),
                               rtol=0, atol=tol)
    torch.testing.assert_close(out.ratio.cpu().double(), torch.where(m, ratio, 0).detach(),
                               rtol=0, atol=2 * tol * ratio.max().item())
    truncating = backend == "triton" and triton_interpret()
    torch.testing.assert_close(xd.grad.cpu().double(), x64.grad, rtol=0,
                               atol=grad_tolerance(x64.grad, lip * tol, x.dtype, truncating))
    return out


OPTION_GRID = list(itertools.product(AGGS, ["k1", "k2", "k3"], [None, 3.0], [0.0, 0.01],
                                     [1.0, 0.8]))


@pytest.mark.parametrize("backend", backend_params("logprobs"))
@pytest.mark.parametrize("agg,kl_estimator,dual_clip,entropy_coef,temperature", OPTION_GRID)
def test_actor_loss_options(rng, backend, agg, kl_estimator, dual_clip, entropy_coef,
                            temperature):
    if backend == "triton" and not torch.cuda.is_available() and temperature != 1.0:
        pytest.skip("Triton interpreter (no GPU): half of the grid keeps the run short")
    x, y, old, adv, mask, ref = make_batch(rng, 3, 7, 100, temperature=temperature)
    out = run_and_compare(backend, x, y, old, adv, mask, ref, agg=agg, kl_coef=0.1,
                          kl_estimator=kl_estimator, dual_clip=dual_clip,
                          entropy_coef=entropy_coef, temperature=temperature)
    assert 0 <= out.clipfrac.item() <= 1 and out.approx_kl.item() >= 0
    assert out.kl is not None


@pytest.mark.parametrize("backend", backend_params("logprobs"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch,length,vocab", [(1, 1, 7), (2, 3, 1000), (1, 4, 32000)])
def test_actor_loss_shapes_dtypes(rng, backend, dtype, batch, length, vocab):
    if backend == "triton" and not torch.cuda.is_available() and vocab > 1000:
        pytest.skip("Triton interpreter (no GPU): small shapes only")
    x, y, old, adv, mask, ref = make_batch(rng, batch, length, vocab, dtype)
    run_and_compare(backend, x, y, old, adv, mask, ref, kl_coef=0.05, entropy_coef=0.01)


@pytest.mark.parametrize("backend", backend_params("logprobs"))
def test_actor_loss_all_masked(backend):
    dev = device_for(backend)
    x = torch.randn(2, 3, 11, device=dev, requires_grad=True)
    zeros = torch.zeros(2, 3, device=dev)
    mask = torch.zeros(2, 3, dtype=torch.bool, device=dev)
    for agg in AGGS:
        out = rlhf_kernels.ppo_actor_loss(x, torch.zeros(2, 3, dtype=torch.long, device=dev),
                                          zeros, zeros, mask, agg=agg, backend=backend)
        out.loss.backward()
        assert out.loss.item() == 0 and torch.all(x.grad == 0)
        assert out.clipfrac.item() == 0 and torch.all(out.logprobs == 0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_actor_loss_gradcheck_float64(rng, backend):
    x, y, old, adv, mask, ref = make_batch(rng, 2, 3, 7, temperature=0.9)
    x = x.double().requires_grad_()
    y = torch.where(mask, y, 0)

    def f(x):
        return rlhf_kernels.ppo_actor_loss(
            x, y, old.double(), adv.double(), mask, ref_logprobs=ref.double(), kl_coef=0.1,
            entropy_coef=0.01, dual_clip=3.0, temperature=0.9, backend=backend).loss

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_fused_path_allocates_no_float32_logits(rng):
    """bf16 logits: no allocation reaches the size of a float32 [B, T, V] copy; beyond the
    grad-logits (bf16) the extra memory is O(B*T); in place, not even the grad is allocated."""
    B, T, V = 2, 16, 5000
    x, y, old, adv, mask, ref = make_batch(rng, B, T, V, torch.bfloat16)
    for inplace in (False, True):
        leaf = x.clone().requires_grad_()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            logits = leaf * 1.0  # as out of an LM head: the backward needs none of it
            out = rlhf_kernels.ppo_actor_loss(logits, y, old, adv, mask, ref_logprobs=ref,
                                              kl_coef=0.1, entropy_coef=0.01, backend="cpu",
                                              inplace_backward=inplace)
            out.loss.backward()
        events = [e for e in prof.events()
                  if e.name == "GeneratedBackwardFor_rlhf_kernels_logprobs_fwd_defaultBackward"]
        assert events
        grad_bytes = 0 if inplace else B * T * V * 2
        assert max(e.cpu_memory_usage for e in events) <= grad_bytes + 64 * B * T * 4
        fwd = [e for e in prof.events() if e.name == "rlhf_kernels::logprobs_fwd"]
        assert fwd and max(e.cpu_memory_usage for e in fwd) <= 64 * B * T * 4
        biggest = max(e.cpu_memory_usage for e in prof.events())
        assert biggest < B * T * V * 4


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(labels_value=1000), ValueError, r"labels must be in \[0, 100\)"),
    (dict(old_shape=(3, 6)), ValueError, "old_logprobs must have shape"),
    (dict(adv_dtype=torch.int64), TypeError, "advantages must be a floating"),
    (dict(logits_dtype=torch.int64), TypeError, "logits must be a floating"),
    (dict(mask_shape=(3, 6)), ValueError, "mask must have shape"),
    (dict(kl_coef=0.1, no_ref=True), ValueError, "kl_coef != 0 needs ref_logprobs"),
    (dict(dual_clip=0.5), ValueError, "dual_clip must be > 1"),
    (dict(agg="mean"), ValueError, "agg must be one of"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator must be one of"),
    (dict(temperature=-1.0), ValueError, "temperature must be"),
])
def test_actor_loss_bad_input(kwargs, error, match):
    x = torch.randn(3, 7, 100).to(kwargs.pop("logits_dtype", torch.float32))
    y = torch.zeros(3, 7, dtype=torch.long)
    y[1, 2] = kwargs.pop("labels_value", 0)
    old = torch.zeros(kwargs.pop("old_shape", (3, 7)))
    adv = torch.zeros(3, 7, dtype=kwargs.pop("adv_dtype", torch.float32))
    mask = torch.ones(kwargs.pop("mask_shape", (3, 7)), dtype=torch.bool)
    ref = None if kwargs.pop("no_ref", False) else torch.zeros(3, 7)
    with pytest.raises(error, match=match):
        rlhf_kernels.ppo_actor_loss(x, y, old, adv, mask, ref_logprobs=ref, **kwargs)


@pytest.mark.parametrize("agg", AGGS)
def test_critic_loss_matches_float64(rng, agg):
    v = torch.randn(4, 9, generator=rng, requires_grad=True)
    old = torch.randn(4, 9, generator=rng)
    ret = torch.randn(4, 9, generator=rng)
    mask = torch.rand(4, 9, generator=rng) > 0.3
    mask[1] = False
    out = rlhf_kernels.ppo_critic_loss(v, old, ret, mask, clip=0.2, agg=agg)
    out.loss.backward()
    v64 = v.detach().double().requires_grad_()
    diff = v64 - old.double()
    vc = v64 + (torch.clamp(diff, -0.2, 0.2) - diff)  # old + clamp(diff), exact when unclipped
    per_token = 0.5 * torch.maximum((v64 - ret.double()) ** 2, (vc - ret.double()) ** 2)
    zero = torch.zeros_like(per_token)
    sums, counts = torch.where(mask, per_token, zero).sum(-1), mask.sum(-1).double()
    expected = {"token-mean": sums.sum() / counts.sum(),
                "seq-mean-token-mean": (sums / counts.clamp(min=1)).mean(),
                "seq-mean-token-sum": sums.mean(),
                "seq-mean-token-sum-norm": sums.sum() / per_token.numel()}[agg]
    expected.backward()
    # float32 elementwise math and a sum over 36 terms: a few ulps of the largest term
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v.grad.double(), v64.grad, rtol=1e-6, atol=1e-7)
    clipped = ((vc - ret.double()) ** 2 > (v64 - ret.double()) ** 2) & mask
    assert out.clipfrac.item() == pytest.approx(clipped.sum().item() / mask.sum().item())


def test_critic_loss_bad_input():
    v = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="returns must have shape"):
        rlhf_kernels.ppo_critic_loss(v, v, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match="clip must be >= 0"):
        rlhf_kernels.ppo_critic_loss(v, v, v, m, clip=-1)
    with pytest.raises(TypeError, match="old_values must be a floating"):
        rlhf_kernels.ppo_critic_loss(v, torch.zeros(2, 3, dtype=torch.long), v, m)
    with pytest.raises(TypeError, match="backend"):  # torch on every device: nothing to pick
        rlhf_kernels.ppo_critic_loss(v, v, v, m, backend="cuda")
