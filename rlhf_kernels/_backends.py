"""Which backends exist here, and which one an op call runs on.

`auto` picks, for a CUDA tensor: the CUDA kernel when built, else Triton, else torch; for a CPU
tensor: the C++ kernel when built, else torch. Triton runs CPU tensors only under
TRITON_INTERPRET=1. A missing extension costs one warning and a fallback, never an import error;
an explicitly requested backend that is missing raises BackendUnavailable saying how to get it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")
BUILD_HINT = "build it with `pip install -e . --no-build-isolation` (see README, 'Build')"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


@functools.lru_cache(maxsize=None)
def extension():
    """(module, None) when rlhf_kernels._C imports, else (None, reason)."""
    try:
        return importlib.import_module("rlhf_kernels._C"), None
    except ImportError as e:  # not built, or built against another torch
        return None, f"rlhf_kernels._C could not be imported ({e})"


@functools.lru_cache(maxsize=None)
def triton_status():
    """(True, None) when Triton imports, else (False, reason)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton is not importable ({e.__class__.__name__}: {e})"
    return True, None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_status(op: str, backend: str):
    """(available, reason) for `op` on `backend`, regardless of the device of any tensor."""
    if backend == "torch":
        return True, None
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return ok, why
        if importlib.util.find_spec(f"rlhf_kernels.triton.{op}") is None:
            return False, f"no Triton kernel for {op} yet"
        if not torch.cuda.is_available() and not triton_interpret():
            return True, "no CUDA device: runs CPU tensors only with TRITON_INTERPRET=1"
        return True, None
    ext, why = extension()
    if ext is None:
        return False, why
    if not any(hasattr(ext, f"{op}{part}_{backend}") for part in ("", "_fwd")):
        if backend == "cuda":
            return False, ("the extension was built without CUDA "
                           f"({ext.build_info.get('cuda_reason', '?')}); rebuild with RLHF_KERNELS_CUDA=1")
        return False, f"the extension has no {op}_{backend}; rebuild it"
    if backend == "cuda" and not torch.cuda.is_available():
        return True, "built, but no CUDA device is visible"
    return True, None


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The backend that runs `op` on tensors of `device`."""
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    on_cuda = device.type == "cuda"
    if backend == "auto":
        order = ("cuda", "triton", "torch") if on_cuda else ("cpu", "torch")
        for i, name in enumerate(order):
            ok, why = kernel_status(op, name)
            if ok:
                return name
            if i == 0:
                _warn_once(f"{op}:{name}", f"rlhf_kernels: {op} falls back from the {name} "
                           f"backend: {why}. {BUILD_HINT}.")
        raise AssertionError("unreachable: torch is always available")
    if backend == "cuda" and not on_cuda:
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "triton" and not on_cuda and not triton_interpret():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                         f"tensors), got tensors on {device}")
    ok, why = kernel_status(op, backend)
    if not ok:
        hint = "pip install triton" if backend == "triton" else BUILD_HINT
        raise BackendUnavailable(f"{op}: backend {backend!r} is not available: {why}; {hint}")
    return backend


def layer_kernel(op: str, backend: str, *tensors: torch.Tensor):
    """The extension, when the float32 CPU kernel `<op>_cpu` of a decoder-layer op (rms_norm,
    rope, swiglu) serves these tensors; None where the op's torch reference runs. These ops
    have no GPU kernels of ours (GPUs run torch's), so backend is "auto", "cpu" or "torch"."""
    if backend not in ("auto", "cpu", "torch"):
        raise ValueError(f"{op}: backend must be 'auto', 'cpu' or 'torch', got {backend!r}")
    ext = None if backend == "torch" else extension()[0]
    applies = ext is not None and hasattr(ext, f"{op}_cpu") and all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    if backend == "cpu" and not applies:
        raise BackendUnavailable(f"{op}: the cpu backend needs float32 CPU tensors and the "
                                 f"built extension; {BUILD_HINT}")
    return ext if applies else None
