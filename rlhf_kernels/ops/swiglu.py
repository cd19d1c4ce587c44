"""silu(gate) * up on our CPU kernels, forward and backward, for the generation adapters'
forwards of Llama-family models (decode steps, experience and training forwards).

    swiglu(gate, up, *, backend="auto") -> silu(gate) * up

torch runs it as silu and a multiply forward, silu_backward and two multiplies backward; the
kernels make it one pass each way (csrc/cpu/swiglu.cpp). Float32 CPU tensors of one shape
take the kernels; anything else (and backend="torch") the reference.
"""
from __future__ import annotations

import torch

from .. import _backends
from ..reference.swiglu import swiglu as reference


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, ext):
        ctx.save_for_backward(gate, up)
        ctx.ext = ext
        return ext.swiglu_cpu(gate, up)

    @staticmethod
    def backward(ctx, grad_y):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = ctx.ext.swiglu_backward_cpu(grad_y, gate, up)
        return (grad_gate if ctx.needs_input_grad[0] else None,
                grad_up if ctx.needs_input_grad[1] else None, None)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate, up of one shape; differentiable."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must have the same shape, got "
                         f"{tuple(gate.shape)} and {tuple(up.shape)}")
    ext = _backends.layer_kernel("swiglu", backend, gate, up)
    if ext is None:
        return reference(gate, up)
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad):
        return ext.swiglu_cpu(gate, up)  # decode steps: no Function overhead
    return SwiGLUFunction.apply(gate, up, ext)
