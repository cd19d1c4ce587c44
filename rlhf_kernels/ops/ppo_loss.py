"""PPO actor and critic losses.

    ppo_actor_loss(logits, labels, old_logprobs, advantages, mask, *, clip_low=0.2,
                   clip_high=0.2, dual_clip=None, ref_logprobs=None, kl_coef=0.0,
                   kl_estimator="k3", entropy_coef=0.0, temperature=1.0, agg="token-mean",
                   ratio_clamp=20.0, inplace_backward=False, backend="auto") -> PPOActorOutput
    ppo_critic_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean")
        -> PPOCriticOutput

The [B, T, V] work (log-probs and entropy, forward and backward) runs in one fused kernel pass
each way; the PPO formulas then act on [B, T] tensors (rlhf_kernels.reference.ppo_loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..reference import ppo_loss as F
from . import _checks
from .logprobs import check_logits_labels, check_temperature, token_logprobs


@dataclass
class PPOActorOutput:
    loss: torch.Tensor              # scalar, differentiable
    logprobs: torch.Tensor          # [B, T] float32, detached, 0 where mask is 0
    entropy: torch.Tensor           # [B, T]
    ratio: torch.Tensor             # [B, T] exp(clamped logp - old)
    clipfrac: torch.Tensor          # scalar: share of valid tokens where the clip was active
    approx_kl: torch.Tensor         # scalar: masked mean of 0.5 * (logp - old)^2
    kl: Optional[torch.Tensor]      # scalar: masked mean of the KL estimator vs the reference


@dataclass
class PPOCriticOutput:
    loss: torch.Tensor
    clipfrac: torch.Tensor


def check_token_tensor(name, x, shape, device):
    x = _checks.float_tensor(name, x)
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    return x


def check_ppo_inputs(shape, device, old_logprobs, advantages, ref_logprobs, *, clip_low,
                     clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, agg,
                     ratio_clamp):
    """Checked (old_logprobs, advantages, ref_logprobs) of `shape`, and the checked options
    (the float ones as floats) as a dict."""
    old_logprobs = check_token_tensor("old_logprobs", old_logprobs, shape, device)
    advantages = check_token_tensor("advantages", advantages, shape, device)
    if ref_logprobs is not None:
        ref_logprobs = check_token_tensor("ref_logprobs", ref_logprobs, shape, device)
    opts = check_options(clip_low, clip_high, dual_clip, ref_logprobs, kl_coef, kl_estimator,
                         entropy_coef, agg, ratio_clamp)
    return old_logprobs, advantages, ref_logprobs, opts


def check_options(clip_low, clip_high, dual_clip, ref_logprobs, kl_coef, kl_estimator,
                  entropy_coef, agg, ratio_clamp):
    """The options as a dict (without agg), each float option a float: an option that is no
    number is an error naming it here, not a TypeError from deep inside the loss."""
    opts = {}
    for name, v in (("clip_low", clip_low), ("clip_high", clip_high),
                    ("ratio_clamp", ratio_clamp)):
        opts[name] = _checks.number(name, v)
        if not opts[name] >= 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if dual_clip is not None:
        dual_clip = _checks.number("dual_clip", dual_clip)
        if not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if kl_estimator not in F.KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {F.KL_ESTIMATORS}, got {kl_estimator!r}")
    # coefficients multiply the loss terms: NaN / inf would poison every gradient
    kl_coef = _checks.number("kl_coef", kl_coef, finite=True)
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if agg not in F.AGGREGATIONS:
        raise ValueError(f"agg must be one of {F.AGGREGATIONS}, got {agg!r}")
    entropy_coef = _checks.number("entropy_coef", entropy_coef, finite=True)
    return dict(opts, dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator,
                entropy_coef=entropy_coef)


def actor_loss_from_logprobs(logp, entropy, old_logprobs, advantages, mask, *, clip_low,
                             clip_high, dual_clip, ref_logprobs, kl_coef, kl_estimator,
                             entropy_coef, agg, ratio_clamp) -> PPOActorOutput:
    """The PPO objective given differentiable log-probs and entropy [B, T]."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    keep = lambda x: None if x is None else torch.where(mask, x.to(logp.dtype), zero)  # noqa
    old, adv, ref = keep(old_logprobs), keep(advantages), keep(ref_logprobs)
    loss, ratio, clipped, kl = F.actor_token_loss(
        logp, entropy, old, adv, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        ref_logp=ref, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
        ratio_clamp=ratio_clamp)
    with torch.no_grad():
        d = logp.detach() - old
        stats = dict(
            logprobs=torch.where(mask, logp.detach(), zero),
            entropy=torch.where(mask, entropy.detach(), zero),
            ratio=torch.where(mask, ratio.detach(), zero),
            clipfrac=F.masked_mean(clipped.to(logp.dtype), mask),
            approx_kl=F.masked_mean(0.5 * d * d, mask),
            kl=None if kl is None else F.masked_mean(kl.detach(), mask))
    return PPOActorOutput(loss=F.aggregate(loss, mask, agg), **stats)


def ppo_actor_loss(logits, labels, old_logprobs, advantages, mask, *, clip_low=0.2,
                   clip_high=0.2, dual_clip=None, ref_logprobs=None, kl_coef=0.0,
                   kl_estimator="k3", entropy_coef=0.0, temperature=1.0, agg="token-mean",
                   ratio_clamp=20.0, inplace_backward=False, backend="auto") -> PPOActorOutput:
    _checks.real_tensors("ppo_actor_loss", logits=logits, labels=labels, mask=mask,
                         old_logprobs=old_logprobs, advantages=advantages,
                         ref_logprobs=ref_logprobs)
    logits = _checks.float_tensor("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    shape = logits.shape[:-1]
    mask = _checks.mask_tensor("mask", mask, shape)
    logits, labels = check_logits_labels(logits, labels, mask)
    opts = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                kl_estimator=kl_estimator, entropy_coef=entropy_coef, ratio_clamp=ratio_clamp)
    old_logprobs, advantages, ref_logprobs, opts = check_ppo_inputs(
        shape, logits.device, old_logprobs, advantages, ref_logprobs, agg=agg, **opts)
    temperature = check_temperature(temperature)
    logp, entropy = token_logprobs(logits, labels, temperature, True, backend, inplace_backward)
    return actor_loss_from_logprobs(logp, entropy, old_logprobs, advantages, mask,
                                    ref_logprobs=ref_logprobs, agg=agg, **opts)


def ppo_critic_loss(values, old_values, returns, mask, *, clip=0.2,
                    agg="token-mean") -> PPOCriticOutput:
    """Elementwise on [B, T]: one torch expression on every device, so no kernel and no
    `backend` argument (the report's op x backend table does not list it)."""
    values = _checks.float_tensor("values", values)
    if values.dim() != 2:
        raise ValueError(f"values must be [B, T], got shape {tuple(values.shape)}")
    old_values = check_token_tensor("old_values", old_values, values.shape, values.device)
    returns = check_token_tensor("returns", returns, values.shape, values.device)
    mask = _checks.mask_tensor("mask", mask, values.shape)
    if not float(clip) >= 0:
        raise ValueError(f"clip must be >= 0, got {clip}")
    if agg not in F.AGGREGATIONS:
        raise ValueError(f"agg must be one of {F.AGGREGATIONS}, got {agg!r}")
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=dtype, device=values.device)
    v = values.to(dtype)
    old = torch.where(mask, old_values.to(dtype), zero)
    ret = torch.where(mask, returns.to(dtype), zero)
    loss, clipped = F.critic_token_loss(v, old, ret, clip)
    with torch.no_grad():
        clipfrac = F.masked_mean(clipped.to(dtype), mask)
    return PPOCriticOutput(loss=F.aggregate(loss, mask, agg), clipfrac=clipfrac)
