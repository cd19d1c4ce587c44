"""Advantage estimators, one per algorithm: tensors in, (advantages [B, N], returns or None) out.

GAE and its discounted sums are computed by rlhf_kernels.gae; the group estimators only need
per-group means. Group estimators take `group_size` consecutive rows as the samples of one
prompt and broadcast the sequence advantage to every response token; every output is float32
and 0 where the action mask is 0.
"""
from __future__ import annotations

import torch

import rlhf_kernels


def check_groups(batch_size: int, group_size: int) -> int:
    """The number of groups; ValueError unless group_size >= 2 divides the batch."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (samples per prompt), "
                         f"got {group_size!r}")
    if batch_size % group_size:
        raise ValueError(f"batch size {batch_size} is not divisible by group_size "
                         f"{group_size}: every prompt needs all its {group_size} samples in "
                         "the batch, in consecutive rows")
    return batch_size // group_size


def _grouped(scores: torch.Tensor, action_mask: torch.Tensor, group_size: int):
    """Each score's offset from the first of its group, float64 [groups, group_size]: all
    group statistics are shift-invariant, and identical scores give exact zeros."""
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask must be [B, N], got shape {tuple(action_mask.shape)}")
    if not isinstance(scores, torch.Tensor) or scores.shape != action_mask.shape[:1]:
        raise ValueError(f"scores must have shape {tuple(action_mask.shape[:1])}, got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    groups = check_groups(scores.shape[0], group_size)
    grouped = scores.double().view(groups, group_size)
    return grouped - grouped[:, :1]


def _broadcast(sequence_advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    adv = sequence_advantages.reshape(-1, 1).float().expand(action_mask.shape)
    return torch.where(action_mask != 0, adv, 0.0)


def gae_advantages(rewards, values, action_mask, *, gamma=1.0, lam=0.95, whiten=False):
    """PPO: GAE over the response tokens with DeepSpeed-Chat's masking ("zero" mode: padding
    has reward 0 and value 0). Returns (advantages, returns), returns before whitening."""
    return rlhf_kernels.gae(rewards, values, action_mask, gamma=gamma, lam=lam, mode="zero",
                            whiten=whiten)


def group_normalized_advantages(scores, action_mask, group_size, *, scale_by_std=True,
                                eps=1e-4):
    """GRPO: A_i = (s_i - mean_group) / (std_group + eps), std unbiased; scale_by_std=False
    keeps only the centring (Dr. GRPO). Returns (advantages, None)."""
    offset = _grouped(scores, action_mask, group_size)
    centred = offset - offset.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (offset.std(dim=1, keepdim=True) + eps)
    return _broadcast(centred, action_mask), None


def leave_one_out_advantages(sequence_rewards, action_mask, group_size):
    """RLOO: A_i = R_i - mean_{j != i} R_j within each group. Returns (advantages, None)."""
    offset = _grouped(sequence_rewards, action_mask, group_size)
    others = (offset.sum(dim=1, keepdim=True) - offset) / (group_size - 1)
    return _broadcast(offset - others, action_mask), None


def reinforce_advantages(rewards, action_mask, *, gamma=1.0):
    """REINFORCE with a batch baseline (REINFORCE++): returns-to-go G_t = sum_k gamma^k r_{t+k}
    (GAE with values 0 and lambda 1), advantages = G whitened over the valid tokens of the
    batch (the batch mean is the baseline). Returns (advantages, returns = G)."""
    values = torch.zeros_like(rewards, dtype=torch.float32)
    return rlhf_kernels.gae(rewards, values, action_mask, gamma=gamma, lam=1.0, mode="zero",
                            whiten=True)
