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

import torch

from .. import _backends
from ..reference import gae as reference
from . import _checks

MODES = ("zero", "skip")


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

    name = _backends.resolve("gae", backend, device)
    r, v, m = rewards.detach().contiguous(), values.detach().contiguous(), mask.contiguous()
    if name == "torch":
        adv, ret, bad = _torch_gae(r, v, m, cu_seqlens, gamma, lam, mode, whiten)
    elif name == "triton":
        from ..triton import gae_launch
        adv, ret, bad = gae_launch.gae(r, v, m, cu_seqlens, gamma, lam, mode == "skip", whiten)
    else:
        ext, _ = _backends.extension()
        fn = ext.gae_cuda if name == "cuda" else ext.gae_cpu
        row_len = 0 if packed else r.shape[1]
        adv, ret, bad = fn(r.reshape(-1), v.reshape(-1), m.reshape(-1), cu_seqlens, row_len,
                           gamma, lam, mode == "skip", whiten)
    _raise_if_bad(int(bad.item()))
    return adv.view(rewards.shape), ret.view(rewards.shape)


def _raise_if_bad(bad: int) -> None:
    # backends report non-finite valid inputs as bits: 1 = rewards, 2 = values
    for bit, name in ((1, "rewards"), (2, "values")):
        if bad & bit:
            raise ValueError(f"{name} holds a non-finite value (NaN or inf) at a valid "
                             "(mask = 1) position")


def _torch_gae(r, v, m, cu_seqlens, gamma, lam, mode, whiten):
    bad = int(bool((~torch.isfinite(r) & m).any())) | 2 * int(bool((~torch.isfinite(v) & m).any()))
    if cu_seqlens is not None:  # the reference works on padded rows
        index, pad_mask = _padding_index(cu_seqlens)
        adv_p, ret_p = reference.gae(r[index], v[index], m[index] & pad_mask, gamma, lam, mode,
                                     whiten)
        adv, ret = torch.empty_like(r, dtype=adv_p.dtype), torch.empty_like(r, dtype=adv_p.dtype)
        adv[index[pad_mask]] = adv_p[pad_mask]
        ret[index[pad_mask]] = ret_p[pad_mask]
    else:
        adv, ret = reference.gae(r, v, m, gamma, lam, mode, whiten)
    return adv.float(), ret.float(), torch.tensor(bad)


def _padding_index(cu_seqlens: torch.Tensor):
    """index [B, Tmax] into the packed tensor and the mask of real positions."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    pos = torch.arange(int(lengths.max()), device=cu.device)
    pad_mask = pos[None, :] < lengths[:, None]
    index = torch.where(pad_mask, cu[:-1, None] + pos[None, :], 0)
    return index, pad_mask
