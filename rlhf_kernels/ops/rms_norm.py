"""RMSNorm on our CPU kernels, forward and backward, for the whole-sequence forwards of the
generation adapters (decode steps, experience forwards, training forwards).

    rms_norm(x, weight, eps, *, backend="auto") -> weight * x / sqrt(mean(x^2, -1) + eps)

On the CPU torch runs this norm as a chain of ATen ops, ~16 autograd nodes per call with its
backward; the kernels make it one pass forward and two backward (csrc/cpu/rms_norm.cpp).
They take float32 CPU tensors; anything else (and backend="torch") runs the reference, which
rounds as Hugging Face does. On GPUs torch's own fused norm serves.
"""
from __future__ import annotations

import torch

from .. import _backends
from ..reference.rms_norm import rms_norm as reference


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, ext):
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.ext = eps, ext
        return ext.rms_norm_cpu(x, weight, eps)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight = ctx.ext.rms_norm_backward_cpu(grad_y, x, weight, ctx.eps)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_weight if ctx.needs_input_grad[1] else None, None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim of x [..., H] with weight [H]; differentiable."""
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"rms_norm: x [..., H] needs weight [H], got x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    ext = _backends.layer_kernel("rms_norm", backend, x, weight)
    if ext is None:
        return reference(x, weight, eps)
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return ext.rms_norm_cpu(x, weight, float(eps))  # decode steps: no Function overhead
    return RMSNormFunction.apply(x, weight, float(eps), ext)
