"""Token log-probs and entropy from logits: checks, dispatch and the autograd Function.

    logprobs(logits, labels, *, temperature=1.0, return_entropy=False, inplace_backward=False,
             backend="auto") -> logp  (or (logp, entropy))

z = logits / temperature; logp = z[label] - LSE(z); entropy = LSE(z) - sum softmax(z) * z.
The kernels read the logits once forward and once backward and write grad-logits once, in the
logits dtype; no float32 copy of [B, T, V] is made. With inplace_backward=True the gradient is
written into the logits' own storage (use it only when nothing reads the logits after backward).
Outputs are float32 (float64 for float64 logits, so that gradcheck can run).
"""
from __future__ import annotations

import math

import torch

from .. import _backends
from ..reference import logprobs as reference
from . import _checks


def kernels(backend: str):
    """(forward, backward) callables of a kernel backend, C++-style signatures."""
    if backend == "triton":
        from ..triton import logprobs as tri
        return tri.logprobs_fwd, tri.logprobs_bwd
    ext, _ = _backends.extension()
    return getattr(ext, f"logprobs_fwd_{backend}"), getattr(ext, f"logprobs_bwd_{backend}")


class LogProbsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, inv_temperature, with_entropy, backend, inplace):
        fwd, _ = kernels(backend)
        logp, entropy, lse = fwd(logits, labels, inv_temperature, with_entropy)
        ctx.save_for_backward(logits, labels, lse, entropy if with_entropy else None)
        ctx.inv_temperature, ctx.backend, ctx.inplace = inv_temperature, backend, inplace
        ctx.set_materialize_grads(False)  # an unused entropy sends None, not zeros
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 6
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        _, bwd = kernels(ctx.backend)
        grad = logits if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype,
                                                      device=logits.device)
        bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, ctx.inv_temperature, grad)
        return grad, None, None, None, None, None


def check_labels(labels, shape, vocab: int, mask=None) -> torch.Tensor:
    """labels of `shape` as int64, in [0, vocab) where mask is 1; masked labels (padding)
    become 0 so that kernels never index with them."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"labels must have shape {tuple(shape)} (logits without the vocabulary "
                         f"dim), got {tuple(labels.shape)}")
    labels = labels.long()
    valid = labels if mask is None else labels[mask]
    out_of_range = (valid < 0) | (valid >= vocab)
    if valid.numel() and bool(out_of_range.any()):
        bad = valid[out_of_range][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) (the vocabulary of logits), found {bad}")
    return (labels if mask is None else torch.where(mask, labels, 0)).contiguous()


def check_logits_labels(logits, labels, mask=None):
    """Validated (logits [B, T, V] with a contiguous last dim, labels [B, T] int64).
    2-D logits [N, V] with labels [N] are taken as B = 1."""
    logits = _checks.float_tensor("logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, T, V] (or [N, V]), got shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"logits is empty (shape {tuple(logits.shape)})")
    _checks.same_device(logits=logits, labels=labels if isinstance(labels, torch.Tensor)
                        else None, mask=mask)
    labels = check_labels(labels, logits.shape[:-1], logits.shape[-1], mask)
    if logits.dim() == 2:
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, labels


def check_temperature(temperature) -> float:
    t = _checks.number("temperature", temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return t


def token_logprobs(logits, labels, temperature, with_entropy, backend, inplace):
    """Checked inputs -> (logp, entropy or None) [B, T] on the resolved backend."""
    name = _backends.resolve("logprobs", backend, logits.device)
    if name == "torch":
        out = reference.logprobs(logits, labels, temperature, with_entropy)
        return out if with_entropy else (out, None)
    logp, entropy = LogProbsFunction.apply(logits, labels, 1.0 / temperature, with_entropy,
                                           name, inplace)
    return logp, (entropy if with_entropy else None)


def logprobs(logits, labels, *, temperature=1.0, return_entropy=False, inplace_backward=False,
             backend="auto"):
    _checks.real_tensors("logprobs", logits=logits, labels=labels)
    squeeze = logits.dim() == 2 if isinstance(logits, torch.Tensor) else False
    logits3, labels3 = check_logits_labels(logits, labels)
    temperature = check_temperature(temperature)
    logp, entropy = token_logprobs(logits3, labels3, temperature, return_entropy, backend,
                                   inplace_backward)
    if squeeze:
        logp = logp.squeeze(0)
        entropy = entropy.squeeze(0) if entropy is not None else None
    return (logp, entropy) if return_entropy else logp
