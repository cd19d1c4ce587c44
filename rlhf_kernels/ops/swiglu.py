"""silu(gate) * up on our CPU kernels, forward and backward, for the generation adapters'
forwards of Llama-family models (decode steps, experience and training forwards).

    swiglu(gate, up, *, backend="auto") -> silu(gate) * up

torch runs it as silu and a multiply forward, silu_backward and two multiplies backward; the
kernels make it one pass each way (csrc/cpu/swiglu.cpp). Float32 CPU tensors of one shape
take the kernels; anything else (and backend="torch") the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backends
from ..reference.swiglu import swiglu as reference
from . import _checks


@torch.library.custom_op("rlhf_kernels::swiglu", mutates_args=())
def swiglu_op(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    return _backends.kernel("swiglu", backend)[0](gate, up)


@swiglu_op.register_fake
def _(gate, up, backend):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("rlhf_kernels::swiglu_backward", mutates_args=())
def swiglu_backward_op(grad_y: Tensor, gate: Tensor, up: Tensor,
                       backend: str) -> tuple[Tensor, Tensor]:
    return _backends.kernel("swiglu", backend)[1](grad_y, gate, up)


@swiglu_backward_op.register_fake
def _(grad_y, gate, up, backend):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, grad_y):
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = swiglu_backward_op(grad_y.contiguous(), gate, up, ctx.backend)
    return (grad_gate if ctx.needs_input_grad[0] else None,
            grad_up if ctx.needs_input_grad[1] else None, None)


swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: Tensor, up: Tensor, *, backend: str = "auto") -> Tensor:
    """silu(gate) * up for gate, up of one shape; differentiable."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must have the same shape, got "
                         f"{tuple(gate.shape)} and {tuple(up.shape)}")
    name = _checks.choose("swiglu", backend, gate.device, (gate.dtype, up.dtype))
    if name == "torch":
        return reference(gate, up)
    if _checks.direct_call_ok(gate, up):  # eager decode steps: no dispatcher in the way
        return _backends.kernel("swiglu", name)[0](gate, up)
    return swiglu_op(gate, up, name)
