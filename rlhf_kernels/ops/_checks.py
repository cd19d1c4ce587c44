"""Argument checks shared by the ops: each error names the argument at fault."""
from __future__ import annotations

import math
import numbers

import torch

from .. import _backends

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_INT32 = 2**31 - 1


def float_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), "
                        f"got {x.dtype}")
    return x


def real_tensors(op: str, **tensors) -> None:
    """A clear error for meta tensors (shapes, no data): the value checks and the kernels of
    `op` read data, and would otherwise fail deep inside with an error naming neither."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_meta:
            raise ValueError(f"{op}: {name} is a meta tensor (a shape with no data); "
                             f"{op} reads values, so it needs tensors on a real device "
                             f"(cpu or cuda)")


def number(name: str, x, *, finite: bool = False) -> float:
    """x as a float; int, float, numpy scalars and one-element real tensors pass, anything
    else (a string, None, a list...) is an error naming the argument, not float()'s."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_complex() or x.is_meta:
            raise TypeError(f"{name} must be a real number, got a tensor of shape "
                            f"{tuple(x.shape)} and dtype {x.dtype}")
        x = x.item()
    if not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}")
    x = float(x)
    if finite and not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x}")
    return x


def same_device(**tensors: torch.Tensor) -> torch.device:
    items = [(k, t) for k, t in tensors.items() if t is not None]
    device = items[0][1].device
    for name, t in items[1:]:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {items[0][0]} is on {device}")
    return device


def mask_tensor(name: str, mask, shape: torch.Size) -> torch.Tensor:
    """A bool mask of `shape`; a numeric mask must hold only 0 and 1."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or a real 0/1 tensor, got {mask.dtype}")
    # a value check is a host sync, which would break a torch.compile graph: compiled callers
    # get it skipped (a value other than 0 / 1 then counts as 1); pass a bool mask to avoid it
    if not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool)")
    return mask != 0


def unit_interval(name: str, x) -> float:
    x = number(name, x)
    if not (0.0 <= x <= 1.0) or math.isnan(x):
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return x


def cu_seqlens_tensor(cu, total: int, device: torch.device) -> torch.Tensor:
    """int32 offsets [B+1] (their values are checked by the op: cu_seqlens_values)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [B+1] with B >= 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"cu_seqlens is on {cu.device} but rewards is on {device}")
    if total > MAX_INT32:
        raise ValueError(f"packed length {total} does not fit int32 offsets")
    if cu.dtype == torch.int64 and not torch.compiler.is_compiling():
        cu_seqlens_values(cu, total)  # before the cast: int64 values may not fit int32
    return cu.to(torch.int32).contiguous()


def cu_seqlens_values(cu: torch.Tensor, total: int) -> None:
    """cu[0] = 0, non-decreasing, cu[-1] = total; one host sync."""
    host = cu.cpu()
    if int(host[0]) != 0 or int(host[-1]) != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {total}, "
                         f"got {int(host[0])} .. {int(host[-1])}")
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


@torch.compiler.assume_constant_result
def choose(op: str, backend: str, device: torch.device, dtype=None, head_dim=None) -> str:
    """_backends.choose, run once at trace time under torch.compile (its result, a backend
    name, is a constant of the graph: the table's lookups and warnings are not traced)."""
    return _backends.choose(op, backend, device, dtype, head_dim)


def direct_call_ok(*tensors: torch.Tensor) -> bool:
    """True where an op may call its forward kernel directly: eager, and no gradient to
    record. The custom op costs ~0.1 ms of dispatch per call (measured on the CPU), which the
    decode steps of the generation adapters (a few ops per layer per token) would feel."""
    return not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
