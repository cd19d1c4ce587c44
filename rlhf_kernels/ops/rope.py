"""RoPE on our CPU kernel, forward and backward, for the generation adapters' forwards (decode
steps, experience and training forwards of Llama-family models).

    rotate(x, cos, signed_sin, *, backend="auto") -> x * cos + rotate_half(x) * sin

x [B, T, H, D]; tables [B, T, 1, D] from reference.rope.rope_tables. torch runs it as a roll,
two multiplies and an add (and as many backward nodes); the kernel is one pass, and so is the
gradient: the same map with the sin negated (a rotation by -theta). Float32 CPU tensors take
the kernel; anything else (and backend="torch") the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backends
from ..reference.rope import rotate as reference
from . import _checks


def _rows(x, cos, signed_sin):
    """[B, T, H, D] and [B, T, 1, D] -> the kernel's [N, H, D] and [N, D]."""
    batch, length, heads, dim = x.shape
    return (x.reshape(batch * length, heads, dim), cos.reshape(batch * length, dim),
            signed_sin.reshape(batch * length, dim))


def rotate_rows(kernel, x, cos, signed_sin):
    """`kernel` (the CPU RoPE entry point) on x [B, T, H, D] and tables [B, T, 1, D], with no
    checks: for callers that settled dtype and device once (the generation adapters)."""
    return kernel(*_rows(x, cos, signed_sin)).view(x.shape)


@torch.library.custom_op("rlhf_kernels::rope", mutates_args=())
def rope_op(x: Tensor, cos: Tensor, signed_sin: Tensor, backend: str) -> Tensor:
    return rotate_rows(_backends.kernel("rope", backend)[0], x, cos, signed_sin)


@rope_op.register_fake
def _(x, cos, signed_sin, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, cos, signed_sin, backend = inputs
    ctx.save_for_backward(cos, signed_sin)
    ctx.backend = backend


def _backward(ctx, grad_y):
    cos, signed_sin = ctx.saved_tensors
    # the gradient is the same map with the sin negated (a rotation by -theta)
    return rope_op(grad_y, cos, -signed_sin, ctx.backend), None, None, None


rope_op.register_autograd(_backward, setup_context=_setup_context)


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor, *, backend: str = "auto") -> Tensor:
    """RoPE on x [B, T, H, D] with cos, signed_sin [B, T, 1, D]; differentiable in x (the
    tables are constants: positions carry no gradient)."""
    if x.dim() != 4 or cos.shape != (*x.shape[:2], 1, x.shape[3]) \
            or signed_sin.shape != cos.shape or x.shape[3] % 2:
        raise ValueError(f"rope: x [B, T, H, D] (D even) needs tables [B, T, 1, D], got x "
                         f"{tuple(x.shape)}, cos {tuple(cos.shape)}, signed_sin "
                         f"{tuple(signed_sin.shape)}")
    name = _checks.choose("rope", backend, x.device, (x.dtype, cos.dtype, signed_sin.dtype))
    if name == "torch" or cos.requires_grad or signed_sin.requires_grad:
        return reference(x, cos, signed_sin)  # the kernel has no gradient for the tables
    if _checks.direct_call_ok(x):
        return rotate_rows(_backends.kernel("rope", name)[0], x, cos, signed_sin)
    return rope_op(x, cos, signed_sin, name)
