"""Per-token rewards from sequence scores, with KL shaping as in DeepSpeed-Chat.

Every response token gets -kl_ctl * KL estimate(logp_old, logp_ref) (k1 = logp_old - logp_ref by
default, DeepSpeed-Chat's), and the last real response token (EOS included) also gets the score
clipped to +-clip_reward_value. DeepSpeed-Chat adds the score one slot later, at the first
position after the non-pad response tokens; README "Differences from DeepSpeed-Chat" says why
this project does not.
"""
from __future__ import annotations

import torch

from rlhf_kernels.reference.ppo_loss import kl_penalty

from ..models.value import last_token_index


def _check(name, x, shape):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def score_at_last_token(scores: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """[B, N] float32 zeros with scores[b] at the last real response token of row b (a row
    with no response token gets nothing)."""
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask must be [B, N], got shape {tuple(action_mask.shape)}")
    _check("scores", scores, action_mask.shape[:1])
    index, has_token = last_token_index(action_mask)
    out = torch.zeros(action_mask.shape, dtype=torch.float32, device=action_mask.device)
    src = torch.where(has_token, scores.float(), 0.0)
    return out.scatter_(1, index[:, None], src[:, None])


def kl_shaped_rewards(scores, old_logprobs, ref_logprobs, action_mask, *, kl_ctl=0.1,
                      clip_reward_value=5.0, kl_estimator="k1") -> torch.Tensor:
    """KL-shaped per-token rewards [B, N] float32, 0 where action_mask is 0.

    Args:
        scores: [B] sequence scores (reward model or reward function).
        old_logprobs, ref_logprobs: [B, N] log-probs of the response tokens under the policy
            that sampled them and under the reference; ref_logprobs may be None when kl_ctl
            is 0.
        action_mask: [B, N], 1 on response tokens up to and including EOS.
        kl_ctl: KL coefficient.
        clip_reward_value: scores are clamped to +-this first (None: not clipped).
        kl_estimator: "k1" (DeepSpeed-Chat), "k2" or "k3" per-token KL estimate.
    """
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask must be [B, N], got shape {tuple(action_mask.shape)}")
    mask = action_mask != 0
    _check("old_logprobs", old_logprobs, mask.shape)
    if clip_reward_value is not None:
        scores = scores.clamp(-clip_reward_value, clip_reward_value)
    rewards = score_at_last_token(scores, mask)
    if ref_logprobs is None and kl_ctl != 0:
        raise ValueError(f"kl_ctl = {kl_ctl} needs ref_logprobs (the reference model's "
                         "log-probs); pass kl_ctl=0 to train without the KL penalty")
    if kl_ctl == 0:  # no reference term at all: 0 * an overflowing estimate would be NaN
        return rewards
    _check("ref_logprobs", ref_logprobs, mask.shape)
    kl = kl_penalty(old_logprobs.float(), ref_logprobs.float(), kl_estimator)
    return rewards + torch.where(mask, -kl_ctl * kl, 0.0)
