"""The selftest's cases for the training ops (GAE, log-probs, PPO losses, fused LM head): each
runs one op on one backend and dtype on small random inputs, forward and backward, and returns
its Checks against the float64 reference (rlhf_kernels.reference) under the test suite's
bounds (rlhf_kernels.selftest_tolerances). The generation and decoder-layer ops are in
selftest_layer_cases."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import rlhf_kernels

from . import _backends
from . import selftest_tolerances as tol
from .reference import gae as ref_gae
from .reference import logprobs as ref_logprobs
from .reference import ppo_loss as ref_ppo

INF = float("inf")


@dataclass
class Check:
    """One compared quantity: the largest error relative to its bound, and that bound."""
    name: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # False for a NaN error

    @property
    def ratio(self) -> float:
        if self.error == 0:
            return 0.0
        return self.error / self.tolerance if self.tolerance > 0 else INF


@dataclass
class Setup:
    """What a case runs on: a backend, a dtype, the device of its tensors and a seeded
    generator; `tiny` asks for the smallest shapes (the Triton interpreter is slow)."""
    backend: str
    dtype: torch.dtype
    device: torch.device
    gen: torch.Generator

    @property
    def tiny(self) -> bool:
        return self.backend == "triton" and self.device.type == "cpu"

    @property
    def truncating(self) -> bool:
        # the Triton interpreter truncates float32 -> bfloat16 instead of rounding
        return self.backend == "triton" and _backends.triton_interpret()

    def randn(self, *shape, scale=1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen) * scale).to(self.dtype)

    def leaf(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().clone().to(self.device).requires_grad_()


def compare(name: str, got: torch.Tensor, want: torch.Tensor, bound) -> Check:
    """The element of got - want with the largest error / bound (bound a float or a tensor
    of want's shape); equal infinities count as exact, a NaN as an infinite error."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if got.shape != want.shape:
        return Check(f"{name}: shape {tuple(got.shape)}, want {tuple(want.shape)}", INF, 0.0)
    err = torch.where(got == want, 0.0, (got - want).abs()).nan_to_num(nan=INF)
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    if err.numel() == 0:
        return Check(name, 0.0, 0.0)
    ratio = torch.where(err == 0, 0.0, err / bound).nan_to_num(nan=INF).flatten()
    i = int(ratio.argmax())
    return Check(name, err.flatten()[i].item(), bound.flatten()[i].item())


def exact(name: str, mismatches) -> Check:
    """A property that must hold exactly: the number of elements breaking it, bound 0."""
    return Check(name, float(mismatches), 0.0)


def gae_case(s: Setup):
    batch, length = 3, (9 if s.tiny else 37)
    r, v = s.randn(batch, length), s.randn(batch, length)
    m = torch.rand(batch, length, generator=s.gen) >= 0.3
    m[1] = False  # a row with no valid token
    r[~m] = float("nan")  # padding is never read
    checks = []
    for mode, gamma, lam in (("zero", 1.0, 0.95), ("skip", 0.99, 0.95)):
        adv, ret = rlhf_kernels.gae(r.to(s.device), v.to(s.device), m.to(s.device), gamma=gamma,
                                    lam=lam, mode=mode, backend=s.backend)
        want_adv, want_ret = ref_gae.gae(r.double(), v.double(), m, gamma, lam, mode)
        bound = tol.gae(r, v, m, want_adv, gamma, lam, scan=s.backend in ("cuda", "triton"))
        checks += [compare(f"{mode}: advantages", adv, want_adv, bound),
                   compare(f"{mode}: returns", ret, want_ret, tol.gae_returns(bound, want_ret)),
                   exact(f"{mode}: padding not 0",
                         ((adv.cpu() != 0) | (ret.cpu() != 0))[~m].sum())]
    return checks


def logprobs_case(s: Setup):
    batch, length, vocab, temperature = 2, 3, (37 if s.tiny else 5003), 0.7
    x = s.randn(batch, length, vocab, scale=3.0)
    x[0, 1, ::3] = float("-inf")  # a masked vocabulary
    y = torch.randint(0, vocab, (batch, length), generator=s.gen)
    y[0, 1] = 1
    xd = s.leaf(x)
    logp, ent = rlhf_kernels.logprobs(xd, y.to(s.device), temperature=temperature,
                                      return_entropy=True, backend=s.backend)
    x64 = x.double().requires_grad_()
    want_logp, want_ent = ref_logprobs.logprobs(x64, y, temperature, return_entropy=True)
    g_logp, g_ent = torch.randn(2, batch, length, generator=s.gen, dtype=torch.float64)
    ((logp * g_logp.to(s.device)).sum() + (ent * g_ent.to(s.device)).sum()).backward()
    ((want_logp * g_logp).sum() + (want_ent * g_ent).sum()).backward()
    bound = tol.logprobs_fwd(x, temperature)
    return [compare("logprobs", logp, want_logp, bound),
            compare("entropy", ent, want_ent, bound),
            compare("grad logits", xd.grad, x64.grad,
                    tol.logprobs_grad(x64.grad, bound, s.dtype, s.truncating))]


# log-ratios where the clipped objective of PPO_OPTIONS has a kink: r = 1 -/+ clip, dual clip
KINKS = torch.tensor([math.log(0.8), math.log(1.2), math.log(3.0)], dtype=torch.float64)
PPO_OPTIONS = dict(dual_clip=3.0, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01,
                   temperature=0.9, agg="seq-mean-token-mean")


def ppo_inputs(gen: torch.Generator, logits64: torch.Tensor, temperature: float):
    """labels, old / reference log-probs, advantages and a mask with holes and an all-masked
    row for logits [B, T, V]; the ratios stay off the objective's kinks (r = 0.8, 1.2, 3),
    where the gradient jumps and float32 rounding may pick either side."""
    batch, length, vocab = logits64.shape
    y = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.rand(batch, length, generator=gen) > 0.25
    mask[0, 0], mask[-1] = True, False
    true_logp = ref_logprobs.logprobs(logits64.detach(), y, temperature)
    log_ratio = 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    near = (log_ratio[..., None] - KINKS).abs().amin(-1) < 2e-3
    log_ratio = torch.where(near, log_ratio + 4e-3, log_ratio)  # now >= 2e-3 from every kink
    old = (true_logp - log_ratio).float()
    ref = (true_logp + 0.3 * torch.randn(batch, length, generator=gen)).float()
    adv = torch.randn(batch, length, generator=gen)
    y[~mask] = vocab + 5  # labels under mask 0 are padding: never read
    return y, old, adv, mask, ref


def ppo_reference(logits64, y, old, adv, mask, ref):
    """The float64 PPO actor loss, log-probs, entropy and ratio (masked) of PPO_OPTIONS."""
    opts = dict(PPO_OPTIONS)
    temperature, agg = opts.pop("temperature"), opts.pop("agg")
    logp, ent = ref_logprobs.logprobs(logits64, torch.where(mask, y, 0), temperature,
                                      return_entropy=True)
    keep = lambda x: torch.where(mask, x.double(), 0.0)  # noqa: E731
    loss, ratio, _, _ = ref_ppo.actor_token_loss(logp, ent, keep(old), keep(adv),
                                                 ref_logp=keep(ref), **opts)
    return ref_ppo.aggregate(loss, mask, agg), keep(logp), keep(ent), keep(ratio)


def ppo_checks(out, want, bound, lip):
    """The forward checks shared by the PPO actor losses, fused or not."""
    want_loss, want_logp, want_ent, want_ratio = want
    return [compare("loss", out.loss, want_loss, lip * bound),
            compare("logprobs", out.logprobs, want_logp, bound),
            compare("entropy", out.entropy, want_ent, bound),
            compare("ratio", out.ratio, want_ratio, 2 * bound * want_ratio.abs().max().item())]


def ppo_actor_case(s: Setup):
    batch, length, vocab = 3, 5, (37 if s.tiny else 1000)
    x = s.randn(batch, length, vocab, scale=2.0)
    x64 = x.double().requires_grad_()
    y, old, adv, mask, ref = ppo_inputs(s.gen, x64, PPO_OPTIONS["temperature"])
    xd = s.leaf(x)
    dev = s.device
    out = rlhf_kernels.ppo_actor_loss(xd, y.to(dev), old.to(dev), adv.to(dev), mask.to(dev),
                                      ref_logprobs=ref.to(dev), backend=s.backend, **PPO_OPTIONS)
    out.loss.backward()
    want = ppo_reference(x64, y, old, adv, mask, ref)
    want[0].backward()
    bound = tol.logprobs_fwd(x, PPO_OPTIONS["temperature"])
    lip = tol.ppo_lipschitz(adv, PPO_OPTIONS["kl_coef"])
    return ppo_checks(out, want, bound, lip) + [
        compare("grad logits", xd.grad, x64.grad,
                tol.logprobs_grad(x64.grad, lip * bound, s.dtype, s.truncating))]


def critic_case(s: Setup):
    batch, length = 4, 9
    v, old, ret = (s.randn(batch, length) for _ in range(3))
    mask = torch.rand(batch, length, generator=s.gen) > 0.3
    mask[1] = False
    vd = s.leaf(v)
    out = rlhf_kernels.ppo_critic_loss(vd, old.to(s.device), ret.to(s.device),
                                       mask.to(s.device), clip=0.2, agg="seq-mean-token-mean")
    out.loss.backward()
    v64 = v.double().requires_grad_()
    keep = lambda x: torch.where(mask, x.double(), 0.0)  # noqa: E731
    loss, _ = ref_ppo.critic_token_loss(v64, keep(old), keep(ret), 0.2)
    want = ref_ppo.aggregate(loss, mask, "seq-mean-token-mean")
    want.backward()
    (rtol_l, atol_l), (rtol_g, atol_g) = tol.CRITIC_LOSS_TOL, tol.CRITIC_GRAD_TOL
    return [compare("loss", out.loss, want, atol_l + rtol_l * want.abs()),
            compare("grad values", vd.grad, v64.grad, atol_g + rtol_g * v64.grad.abs())]


def lm_head(s: Setup, batch: int, length: int, hidden: int, vocab: int):
    """Hidden states [B, T, H] and an LM head [V, H] scaled to unit-size logits."""
    return s.randn(batch, length, hidden), s.randn(vocab, hidden, scale=hidden ** -0.5)


def fused_logprobs_case(s: Setup):
    h, w = lm_head(s, 1, 5 if s.tiny else 10, 16, 37 if s.tiny else 300)
    y = torch.randint(0, w.shape[0], h.shape[:2], generator=s.gen)
    hd, wd = s.leaf(h), s.leaf(w)
    logp, ent = rlhf_kernels.fused_linear_logprobs(hd, wd, y.to(s.device), temperature=0.9,
                                                   return_entropy=True, chunk_size=3,
                                                   backend=s.backend)
    g_logp, g_ent = torch.randn(2, *y.shape, generator=s.gen, dtype=torch.float64)
    ((logp * g_logp.to(s.device)).sum() + (ent * g_ent.to(s.device)).sum()).backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    want_logp, want_ent = ref_logprobs.logprobs(h64 @ w64.t(), y, 0.9, return_entropy=True)
    ((want_logp * g_logp).sum() + (want_ent * g_ent).sum()).backward()
    bound = tol.fused_linear(h, w)
    return [compare("logprobs", logp, want_logp, bound),
            compare("entropy", ent, want_ent, bound),
            compare("grad hidden", hd.grad, h64.grad, tol.fused_linear_grad(bound, h64.grad)),
            compare("grad weight", wd.grad, w64.grad, tol.fused_linear_grad(bound, w64.grad))]


def fused_ppo_case(s: Setup):
    h, w = lm_head(s, 3, 5, 16, 37 if s.tiny else 200)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    y, old, adv, mask, ref = ppo_inputs(s.gen, h64 @ w64.t(), PPO_OPTIONS["temperature"])
    hd, wd = s.leaf(h), s.leaf(w)
    dev = s.device
    out = rlhf_kernels.fused_linear_ppo_actor_loss(
        hd, wd, y.to(dev), old.to(dev), adv.to(dev), mask.to(dev), ref_logprobs=ref.to(dev),
        chunk_size=4, backend=s.backend, **PPO_OPTIONS)
    out.loss.backward()
    want = ppo_reference(h64 @ w64.t(), y, old, adv, mask, ref)
    want[0].backward()
    # the fused head's log-prob bound, through the loss's Lipschitz factor (as for the
    # unfused loss), then the fused head's gradient bound
    bound = tol.fused_linear(h, w)
    lip = tol.ppo_lipschitz(adv, PPO_OPTIONS["kl_coef"])
    return ppo_checks(out, want, bound, lip) + [
        compare("grad hidden", hd.grad, h64.grad, tol.fused_linear_grad(lip * bound, h64.grad)),
        compare("grad weight", wd.grad, w64.grad, tol.fused_linear_grad(lip * bound, w64.grad))]
