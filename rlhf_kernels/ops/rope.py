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

from .. import _backends
from ..reference.rope import rotate as reference


def _rows(x, cos, signed_sin):
    """[B, T, H, D] and [B, T, 1, D] -> the kernel's [N, H, D] and [N, D]."""
    batch, length, heads, dim = x.shape
    return (x.reshape(batch * length, heads, dim), cos.reshape(batch * length, dim),
            signed_sin.reshape(batch * length, dim))


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, signed_sin, ext):
        ctx.save_for_backward(cos, signed_sin)
        ctx.ext = ext
        return ext.rope_cpu(*_rows(x, cos, signed_sin)).view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        cos, signed_sin = ctx.saved_tensors
        grad_x = ctx.ext.rope_cpu(*_rows(grad_y, cos, -signed_sin)).view(grad_y.shape)
        return grad_x, None, None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, *,
           backend: str = "auto") -> torch.Tensor:
    """RoPE on x [B, T, H, D] with cos, signed_sin [B, T, 1, D]; differentiable in x (the
    tables are constants: positions carry no gradient)."""
    if x.dim() != 4 or cos.shape != (*x.shape[:2], 1, x.shape[3]) \
            or signed_sin.shape != cos.shape or x.shape[3] % 2:
        raise ValueError(f"rope: x [B, T, H, D] (D even) needs tables [B, T, 1, D], got x "
                         f"{tuple(x.shape)}, cos {tuple(cos.shape)}, signed_sin "
                         f"{tuple(signed_sin.shape)}")
    ext = _backends.layer_kernel("rope", backend, x, cos, signed_sin)
    if ext is None or cos.requires_grad or signed_sin.requires_grad:
        return reference(x, cos, signed_sin)
    if not torch.is_grad_enabled() or not x.requires_grad:
        return ext.rope_cpu(*_rows(x, cos, signed_sin)).view(x.shape)
    return RopeFunction.apply(x, cos, signed_sin, ext)
