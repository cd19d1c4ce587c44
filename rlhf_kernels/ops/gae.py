"""Generalized Advantage Estimation: argument checks, backend dispatch.

    gae(rewards, values, mask=None, *, gamma=1.0, lam=0.95, mode="zero", whiten=False,
        cu_seqlens=None, backend="auto") -> (advantages, returns)

See README.md ("GAE") for the recursion of each mode, and rlhf_kernels.reference.gae for it
written out in torch. Inputs are [B, T], or packed [N] with cu_seqlens [B+1]; outputs are
float32 of the same shape, 0 where the mask is 0. Values at masked positions are never read,
so padding may hold anything, NaN included; a non-finite reward or value at a valid position
raises ValueError. Not differentiable: GAE runs on detached rollout data.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backends
from . import _checks

MODES = ("zero", "skip")


@torch.library.custom_op("rlhf_kernels::gae", mutates_args=())
def gae_op(rewards: Tensor, values: Tensor, mask: Tensor, cu_seqlens: Optional[Tensor],
           row_len: int, gamma: float, lam: float, skip: bool, whiten: bool,
           backend: str) -> Tensor:
    """Flat [N] rewards, values, mask (rows of row_len, or packed by cu_seqlens) ->
    [advantages; returns] [2, N] float32. The value checks (offsets, non-finite inputs) read
    data: they run here, inside the op, so that a compiled graph keeps them without a break."""
    if cu_seqlens is not None:
        _checks.cu_seqlens_values(cu_seqlens, rewards.numel())
    (run,) = _backends.kernel("gae", backend)
    adv, ret, bad = run(rewards, values, mask, cu_seqlens, row_len, gamma, lam, skip, whiten)
    _raise_if_bad(int(bad.item()))
    # one output: a custom op's outputs may not alias each other, and the CPU and Triton
    # kernels return both rows of one [2, N] allocation (no copy then)
    both = adv._base
    if both is not None and both is ret._base and both.shape == (2, adv.numel()):
        return both
    return torch.stack((adv, ret))


@gae_op.register_fake
def _(rewards, values, mask, cu_seqlens, row_len, gamma, lam, skip, whiten, backend):
    return rewards.new_empty((2, rewards.numel()), dtype=torch.float32)


def gae(rewards, values, mask=None, *, gamma=1.0, lam=0.95, mode="zero", whiten=False,
        cu_seqlens=None, backend="auto"):
    _checks.real_tensors("gae", rewards=rewards, values=values, mask=mask, cu_seqlens=cu_seqlens)
    rewards = _checks.float_tensor("rewards", rewards)
    values = _checks.float_tensor("values", values)
    packed = cu_seqlens is not None
    want = "1-D [N] (packed, with cu_seqlens)" if packed else "2-D [B, T]"
    if rewards.dim() != (1 if packed else 2):
        raise ValueError(f"rewards must be {want}, got {rewards.dim()}-D {tuple(rewards.shape)}")
    if values.shape != rewards.shape:
        raise ValueError(f"values must have the shape of rewards {tuple(rewards.shape)}, "
                         f"got {tuple(values.shape)}")
    if rewards.numel() == 0:
        raise ValueError(f"rewards is empty (shape {tuple(rewards.shape)}): nothing to compute")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    gamma = _checks.unit_interval("gamma", gamma)
    lam = _checks.unit_interval("lam", lam)
    device = _checks.same_device(rewards=rewards, values=values, mask=mask)
    mask = (torch.ones(rewards.shape, dtype=torch.bool, device=device) if mask is None
            else _checks.mask_tensor("mask", mask, rewards.shape))
    if packed:
        cu_seqlens = _checks.cu_seqlens_tensor(cu_seqlens, rewards.numel(), device)
    elif rewards.numel() > _checks.MAX_INT32:
        raise ValueError(f"rewards has {rewards.numel()} elements; at most 2**31 - 1 are supported")
    if values.dtype != rewards.dtype:
        rewards, values = rewards.float(), values.float()
    name = _checks.choose("gae", backend, device, rewards.dtype)
    flat = [x.detach().contiguous().reshape(-1) for x in (rewards, values, mask)]
    both = gae_op(*flat, cu_seqlens, 0 if packed else rewards.shape[1], gamma, lam,
                  mode == "skip", whiten, name)
    return both[0].view(rewards.shape), both[1].view(rewards.shape)


def _raise_if_bad(bad: int) -> None:
    # backends report non-finite valid inputs as bits: 1 = rewards, 2 = values
    for bit, name in ((1, "rewards"), (2, "values")):
        if bad & bit:
            raise ValueError(f"{name} holds a non-finite value (NaN or inf) at a valid "
                             "(mask = 1) position")
