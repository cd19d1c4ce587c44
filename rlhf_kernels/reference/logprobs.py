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
