"""PPO losses per token and their aggregation, in plain PyTorch.

These functions work on [B, T] tensors (log-probs, entropy, advantages...), so they are cheap
next to the [B, T, V] log-prob pass; every backend runs them, after its own log-prob kernel.
They are the one place the formulas live.
"""
from __future__ import annotations

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of the sampled tokens."""
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(-d) + d - 1.0  # k3 = exp(ref - logp) - (ref - logp) - 1


def actor_token_loss(logp, entropy, old_logp, advantages, *, clip_low=0.2, clip_high=0.2,
                     dual_clip=None, ref_logp=None, kl_coef=0.0, kl_estimator="k3",
                     entropy_coef=0.0, ratio_clamp=20.0):
    """Per-token clipped policy loss with optional dual clip, KL penalty and entropy bonus.

    Returns (loss [B, T], ratio [B, T], clipped [B, T] bool, kl [B, T] or None).
    """
    log_ratio = torch.clamp(logp - old_logp, -ratio_clamp, ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    if dual_clip is not None:  # bound the loss of negative advantages from above
        pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * dual_clip), pg)
    loss = pg
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        loss = loss + kl_coef * kl
    if entropy_coef:
        loss = loss - entropy_coef * entropy
    return loss, ratio, clipped > unclipped, kl


def critic_token_loss(values, old_values, returns, clip=0.2):
    """Per-token clipped value loss: 0.5 * max((v - R)^2, (v_clipped - R)^2)."""
    diff = values - old_values
    # = old + clamp(diff), written so that an unclipped value stays bit-identical to `values`
    # (old + (v - old) can round away from v, and clipfrac would count the token)
    v_clipped = values + (torch.clamp(diff, -clip, clip) - diff)
    unclipped = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def aggregation_weights(mask: torch.Tensor, agg: str, dtype=torch.float32) -> torch.Tensor:
    """Per-token weights w with aggregate(loss) = sum(w * loss); w = 0 where the mask is 0.

    token-mean: sum(m*l) / sum(m); seq-mean-token-mean: mean over rows of sum_t(m*l)/sum_t(m);
    seq-mean-token-sum: mean over rows of sum_t(m*l); seq-mean-token-sum-norm: sum(m*l) / (B*T).
    Rows (or batches) with no valid token contribute 0 instead of 0/0.
    """
    m = mask.to(dtype)
    batch = mask.shape[0]
    if agg == "token-mean":
        return m / m.sum().clamp(min=1.0)
    if agg == "seq-mean-token-mean":
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * batch)
    if agg == "seq-mean-token-sum":
        return m / batch
    if agg == "seq-mean-token-sum-norm":
        return m / mask.numel()
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduce a per-token loss [B, T] under mask to a scalar (see aggregation_weights)."""
    weights = aggregation_weights(mask, agg, loss.dtype)
    masked = torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    return (weights * masked).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return aggregate(x, mask, "token-mean")
