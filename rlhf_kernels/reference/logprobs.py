"""Token log-probs and entropy in plain PyTorch: the readable ground truth.

This is what trainers do today: upcast the logits to float32, log_softmax, gather. It
materialises float32 [B, T, V] tensors; the kernels exist to avoid exactly that.
"""
import torch


def logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
             return_entropy: bool = False):
    """logits [B, T, V], labels [B, T] int64 -> logp [B, T] (and entropy [B, T]), float32
    (float64 for float64 logits). Differentiable w.r.t. logits."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    # -inf logits (masked vocabulary) have p = 0: their term is 0, and so is its gradient
    finite = torch.where(torch.isfinite(logp_all), logp_all, torch.zeros_like(logp_all))
    entropy = -(logp_all.exp() * finite).sum(-1)
    return logp, entropy


def logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, inv_temperature: float,
                 with_entropy: bool):
    """The kernels' forward contract (csrc/logprobs.h) in torch: (logp, entropy, lse) [B, T],
    entropy empty without with_entropy; float32 (float64 for float64 logits)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp, entropy = logprobs(logits, labels, 1.0 / inv_temperature, True)
    lse = (logits.to(dtype) * inv_temperature).logsumexp(-1)
    return logp, (entropy if with_entropy else logp.new_empty(0)), lse


def logprobs_bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temperature: float,
                 grad_logits: torch.Tensor) -> None:
    """The kernels' backward contract in torch: writes
    grad_z = g_logp (onehot(label) - p) - g_ent p (z - lse + entropy), times 1/T, into
    grad_logits (which may be logits itself)."""
    dtype = lse.dtype
    z = logits.to(dtype) * inv_temperature
    p = torch.exp(z - lse.unsqueeze(-1))
    grad = -p * grad_logp.to(dtype).unsqueeze(-1)
    if grad_entropy is not None:
        centred = z - (lse - entropy.to(dtype)).unsqueeze(-1)
        # p == 0 where z == -inf: the product would be 0 * -inf = NaN
        grad -= torch.where(p > 0, p * centred, 0.0) * grad_entropy.to(dtype).unsqueeze(-1)
    grad.scatter_add_(-1, labels.unsqueeze(-1), grad_logp.to(dtype).unsqueeze(-1))
    grad_logits.copy_(grad * inv_temperature)
