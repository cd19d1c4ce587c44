"""The path trainers run today, for bench_e2e.py: HF `generate` (+ a forward for the log-probs),
HF forwards for the experience and the training updates, log_softmax + gather in float32 for
log-probs and entropy, the Python-loop GAE. Swapped in for rlhf_kernels' ops inside
`baseline_path()`; the PPO formulas themselves are shared."""
from __future__ import annotations

import contextlib
import functools

import torch

import rlhf.engine.hybrid as hybrid
import rlhf.models.fused_forward as fused_forward
import rlhf_kernels
from gae_baselines import loop_gae_zero
from rlhf_kernels.generation import generate
from rlhf_kernels.ops.ppo_loss import actor_loss_from_logprobs


def logprobs(logits, labels, *, temperature=1.0, return_entropy=False, **_):
    z = logits.float() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, entropy


def gae(rewards, values, mask=None, *, gamma=1.0, lam=0.95, whiten=False, **_):
    mask = torch.ones_like(rewards) if mask is None else mask.to(rewards.dtype)
    advantages, returns = loop_gae_zero(rewards, values, mask, gamma, lam)
    if whiten:
        valid = mask.bool()
        mean, var = advantages[valid].mean(), advantages[valid].var()
        advantages = (advantages - mean) * torch.rsqrt(var + 1e-8) * mask
    return advantages, returns


def ppo_actor_loss(logits, labels, old_logprobs, advantages, mask, *, clip_low=0.2,
                   clip_high=0.2, dual_clip=None, ref_logprobs=None, kl_coef=0.0,
                   kl_estimator="k3", entropy_coef=0.0, temperature=1.0, agg="token-mean",
                   ratio_clamp=20.0, **_):
    logp, entropy = logprobs(logits, labels, temperature=temperature, return_entropy=True)
    return actor_loss_from_logprobs(
        logp, entropy, old_logprobs, advantages, mask.bool(), clip_low=clip_low,
        clip_high=clip_high, dual_clip=dual_clip, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy_coef=entropy_coef, agg=agg, ratio_clamp=ratio_clamp)


@contextlib.contextmanager
def baseline_path():
    """Inside the block the trainer generates with HF, runs the experience and training
    forwards through HF and computes losses unfused."""
    saved = {name: getattr(rlhf_kernels, name) for name in ("logprobs", "gae", "ppo_actor_loss")}
    saved_generate = hybrid.generate
    try:
        rlhf_kernels.logprobs, rlhf_kernels.gae = logprobs, gae
        rlhf_kernels.ppo_actor_loss = ppo_actor_loss
        hybrid.generate = functools.partial(generate, fused=False)
        fused_forward.ENABLED = False
        yield
    finally:
        for name, fn in saved.items():
            setattr(rlhf_kernels, name, fn)
        hybrid.generate = saved_generate
        fused_forward.ENABLED = True
