"""Per-token rewards from sequence scores, with DeepSpeed-Chat's KL shaping.

DeepSpeed-Chat (step 3, compute_rewards): every response token gets
-kl_ctl * (logp_old - logp_ref) (the k1 estimate of the KL to the reference), and the last real
response token also gets the reward model's score clipped to +-clip_reward_value.
"""
from __future__ import annotations

import torch


def _check(name, x, shape):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def last_token_index(action_mask: torch.Tensor):
    """(index [B], has_token [B]): the position of the last 1 of each row of the mask (0 for a
    row without one, where has_token is False)."""
    mask = action_mask != 0
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).max(dim=1).values
    return last.clamp(min=0), last >= 0


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
                      clip_reward_value=5.0) -> torch.Tensor:
    """DeepSpeed-Chat's per-token rewards [B, N] float32, 0 where action_mask is 0.

    Args:
        scores: [B] sequence scores (reward model or reward function).
        old_logprobs, ref_logprobs: [B, N] log-probs of the response tokens under the policy
            that sampled them and under the reference; ref_logprobs may be None when kl_ctl
            is 0.
        action_mask: [B, N], 1 on response tokens up to and including EOS.
        kl_ctl: KL coefficient.
        clip_reward_value: scores are clamped to +-this first (None: not clipped).
    """
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask must be [B, N], got shape {tuple(action_mask.shape)}")
    mask = action_mask != 0
    _check("old_logprobs", old_logprobs, mask.shape)
    if not kl_ctl >= 0:
        raise ValueError(f"kl_ctl must be >= 0, got {kl_ctl}")
    if clip_reward_value is not None:
        if not clip_reward_value > 0:
            raise ValueError(f"clip_reward_value must be > 0 (or None), got {clip_reward_value}")
        scores = scores.clamp(-clip_reward_value, clip_reward_value)
    rewards = score_at_last_token(scores, mask)
    if ref_logprobs is None:
        if kl_ctl != 0:
            raise ValueError(f"kl_ctl = {kl_ctl} needs ref_logprobs (the reference model's "
                             "log-probs); pass kl_ctl=0 to train without the KL penalty")
        return rewards
    _check("ref_logprobs", ref_logprobs, mask.shape)
    kl = old_logprobs.float() - ref_logprobs.float()
    return rewards + torch.where(mask, -kl_ctl * kl, 0.0)
