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
