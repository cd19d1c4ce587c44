"""GAE in plain PyTorch: the readable ground truth and the last fallback.

A loop over T, vectorised over the batch. Computes in float32 (float64 for float64 inputs).
"""
import torch


def whiten_stats(adv: torch.Tensor, mask: torch.Tensor):
    """Mean and 1/sqrt(unbiased var + 1e-8) over the valid tokens; var is 0 below two tokens."""
    valid = adv[mask]
    n = valid.numel()
    mean = valid.mean() if n > 0 else adv.new_zeros(())
    var = valid.var(unbiased=True) if n > 1 else adv.new_zeros(())
    return mean, torch.rsqrt(var + 1e-8)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95, mode: str = "zero", whiten: bool = False):
    """rewards, values [B, T] float, mask [B, T] bool -> (advantages, returns) [B, T]."""
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    m = mask.bool()
    # select, not multiply: padding may hold NaN
    r = torch.where(m, rewards.to(dtype), 0.0)
    v = torch.where(m, values.to(dtype), 0.0)
    batch, length = r.shape
    adv = torch.zeros_like(r)
    last_adv = r.new_zeros(batch)
    next_value = r.new_zeros(batch)
    for t in reversed(range(length)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * last_adv
        if mode == "zero":  # every position takes part; masked ones have r = v = 0
            last_adv, next_value = a, v[:, t]
        else:  # "skip": masked positions are transparent
            last_adv = torch.where(m[:, t], a, last_adv)
            next_value = torch.where(m[:, t], v[:, t], next_value)
        adv[:, t] = a
    adv = torch.where(m, adv, 0.0)
    returns = torch.where(m, adv + v, 0.0)
    if whiten:
        mean, rstd = whiten_stats(adv, m)
        adv = torch.where(m, (adv - mean) * rstd, 0.0)
    return adv, returns


def gae_kernel(rewards, values, mask, cu_seqlens, row_len: int, gamma: float, lam: float,
               skip: bool, whiten: bool):
    """gae with the kernels' contract (csrc/gae.h): flat [N] inputs, padded rows of row_len or
    packed rows (cu_seqlens) -> (advantages [N] f32, returns [N] f32, bad [1] int32)."""
    r, v, m = rewards, values, mask
    bad = (~torch.isfinite(r) & m).any().int() | 2 * (~torch.isfinite(v) & m).any().int()
    mode = "skip" if skip else "zero"
    if cu_seqlens is not None:  # the reference works on padded rows
        index, pad_mask = _padding_index(cu_seqlens)
        adv_p, ret_p = gae(r[index], v[index], m[index] & pad_mask, gamma, lam, mode, whiten)
        adv, ret = torch.empty_like(r, dtype=adv_p.dtype), torch.empty_like(r, dtype=adv_p.dtype)
        adv[index[pad_mask]] = adv_p[pad_mask]
        ret[index[pad_mask]] = ret_p[pad_mask]
    else:
        shape = (-1, row_len)
        adv, ret = gae(r.view(shape), v.view(shape), m.view(shape), gamma, lam, mode, whiten)
    return adv.float().reshape(-1), ret.float().reshape(-1), bad.reshape(1)


def _padding_index(cu_seqlens: torch.Tensor):
    """index [B, Tmax] into the packed tensor and the mask of real positions."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    pos = torch.arange(int(lengths.max()), device=cu.device)
    pad_mask = pos[None, :] < lengths[:, None]
    index = torch.where(pad_mask, cu[:-1, None] + pos[None, :], 0)
    return index, pad_mask
