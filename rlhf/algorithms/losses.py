"""The losses of one minibatch update: forward passes feeding the rlhf_kernels losses.

The actor's logits are sliced to the response positions (a view of the model's output; no
float32 copy of [B, N, V]) and go straight into the fused PPO loss kernel.
"""
from __future__ import annotations

from typing import Mapping

import torch

import rlhf_kernels

from ..data.tokenized import IGNORE_INDEX
from .model_forward import causal_lm_logits, response_logits, response_values


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def actor_loss(model, mb, hp, algorithm) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO policy loss of an Experience minibatch (with advantages), as `algorithm`
    defines it with the hyper-parameters `hp` (RLHParams): ratio clip hp.cliprange, dual clip
    hp.dual_clip, entropy bonus, aggregation hp.loss_agg, and the KL to the reference as a loss
    term when the algorithm puts it there (coefficient algorithm.loss_kl_coef(hp)).

    The reference log-probs enter the loss only when that coefficient is non-zero: a zero
    coefficient times an overflowing k3 estimate would be NaN.

    Returns:
        (loss, stats): a differentiable scalar and detached scalars actor_loss, clipfrac,
        approx_kl, entropy, ratio (token means) and kl (when the loss has a KL term).
    """
    if mb.advantages is None:
        raise ValueError("the experience has no advantages: run algorithm.advantages first")
    kl_coef = algorithm.loss_kl_coef(hp)
    logits = response_logits(model, mb.sequences, mb.attention_mask, mb.prompt_len)
    out = rlhf_kernels.ppo_actor_loss(
        logits, mb.responses, mb.old_logprobs, mb.advantages, mb.action_mask,
        clip_low=hp.cliprange, clip_high=hp.cliprange, dual_clip=hp.dual_clip,
        ref_logprobs=mb.ref_logprobs if kl_coef != 0 else None, kl_coef=kl_coef,
        kl_estimator=algorithm.kl_estimator(hp), entropy_coef=hp.entropy_coef,
        temperature=hp.temperature, agg=hp.loss_agg)
    mask = mb.action_mask != 0
    stats = {"actor_loss": out.loss.detach(), "clipfrac": out.clipfrac,
             "approx_kl": out.approx_kl, "entropy": _masked_mean(out.entropy, mask),
             "ratio": _masked_mean(out.ratio, mask)}
    if out.kl is not None:
        stats["kl"] = out.kl
    return out.loss, stats


def critic_loss(critic, mb, hp) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (clip hp.cliprange_value, token mean) of an Experience minibatch
    with values and returns.

    Returns (loss, stats) with stats critic_loss, critic_clipfrac, values (token mean)."""
    if mb.values is None or mb.returns is None:
        raise ValueError("the critic loss needs experience.values and experience.returns")
    values = response_values(critic, mb.sequences, mb.attention_mask, mb.prompt_len)
    out = rlhf_kernels.ppo_critic_loss(values, mb.values, mb.returns, mb.action_mask,
                                       clip=hp.cliprange_value)
    mask = mb.action_mask != 0
    return out.loss, {"critic_loss": out.loss.detach(), "critic_clipfrac": out.clipfrac,
                      "values": _masked_mean(values.detach(), mask)}


def ptx_loss(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Next-token loss (mean over target tokens) on a pretraining / SFT batch with input_ids,
    attention_mask and optional labels (IGNORE_INDEX = not a target; default: every real
    token of input_ids)."""
    for key in ("input_ids", "attention_mask"):
        if key not in batch:
            raise ValueError(f"the ptx batch needs {key!r}, got keys {sorted(batch)}")
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    labels = batch.get("labels")
    if labels is None:
        labels = torch.where(attention_mask != 0, input_ids, IGNORE_INDEX)
    if labels.shape != input_ids.shape or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids and labels must be [B, T] with T >= 2, got "
                         f"{tuple(input_ids.shape)} and {tuple(labels.shape)}")
    logits = causal_lm_logits(model, input_ids, attention_mask)[:, :-1]
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    logp = rlhf_kernels.logprobs(logits, torch.where(valid, targets, 0))
    return -_masked_mean(logp, valid)
