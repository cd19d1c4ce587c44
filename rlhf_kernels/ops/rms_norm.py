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
from torch import Tensor

from .. import _backends
from ..reference.rms_norm import rms_norm as reference
from . import _checks


@torch.library.custom_op("rlhf_kernels::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor, eps: float, backend: str) -> Tensor:
    return _backends.kernel("rms_norm", backend)[0](x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("rlhf_kernels::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, eps: float,
                         backend: str) -> tuple[Tensor, Tensor]:
    return _backends.kernel("rms_norm", backend)[1](grad_y, x, weight, eps)


@rms_norm_backward_op.register_fake
def _(grad_y, x, weight, eps, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, eps, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.options = (eps, backend)


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = rms_norm_backward_op(grad_y.contiguous(), x, weight, *ctx.options)
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_weight if ctx.needs_input_grad[1] else None, None, None)


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: Tensor, weight: Tensor, eps: float, *, backend: str = "auto") -> Tensor:
    """RMSNorm over the last dim of x [..., H] with weight [H]; differentiable."""
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"rms_norm: x [..., H] needs weight [H], got x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    name = _checks.choose("rms_norm", backend, x.device, (x.dtype, weight.dtype))
    if name == "torch":
        return reference(x, weight, eps)
    if _checks.direct_call_ok(x, weight):  # eager decode steps: no dispatcher in the way
        return _backends.kernel("rms_norm", name)[0](x, weight, float(eps))
    return rms_norm_op(x, weight, float(eps), name)
