"""Which kernels exist here, and which one an op call runs on: one table, one decision.

TABLE maps op -> backend -> Kernel: where its entry points live ("_C:<name>" in the extension,
"<module>:<name>" under rlhf_kernels), and which dtypes (and, for decode attention on CUDA,
head dims) it serves. Every op looks its kernels up here (`kernel(op, backend)`) and picks a
backend with `choose(op, backend, device, dtype, ...)`:

- `auto` takes, for CUDA tensors, the first of cuda > triton > torch that is available and
  serves the inputs; for CPU tensors cpu > torch (so float64 on CUDA, which only the reference
  computes in float64 throughout, goes to torch). A kernel that is not built costs one warning;
  one that does not serve the dtype or shape is logged once (logger "rlhf_kernels").
- an explicit backend that cannot run raises: ValueError for a wrong device or an unknown name,
  BackendUnavailable (saying how to get it, or what it serves) otherwise.
Triton runs CPU tensors only under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")
BUILD_HINT = "build it with `pip install -e . --no-build-isolation` (see README, 'Build')"
# head dims the CUDA decode-attention kernel is instantiated for (csrc/decode.h lists the same;
# tests/test_decode.py checks that the extension reports these)
DECODE_CUDA_HEAD_DIMS = (64, 80, 96, 128, 256)

ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NO_FLOAT64 = (torch.float16, torch.bfloat16, torch.float32)
FLOAT32 = (torch.float32,)
log = logging.getLogger("rlhf_kernels")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (or cannot serve these inputs)."""


@dataclass(frozen=True)
class Kernel:
    entries: tuple                    # "module:name" of each entry point (forward[, backward])
    dtypes: tuple = ALL_FLOATS        # input dtypes it computes exactly
    head_dims: Optional[tuple] = None  # decode attention: the head dims it is built for
    wrap: Optional[str] = None        # "module:name" of an adapter applied to the loaded entries


def _k(*entries, **kw) -> Kernel:
    return Kernel(entries, **kw)


# op -> backend -> Kernel. The kernels of one op share one calling convention (the contract in
# csrc/<op>.h); the torch entries are the references written to it.
TABLE = {
    "gae": {"cuda": _k("_C:gae_cuda"), "triton": _k("triton.gae:gae"),
            "cpu": _k("_C:gae_cpu"), "torch": _k("reference.gae:gae_kernel")},
    "logprobs": {
        "cuda": _k("_C:logprobs_fwd_cuda", "_C:logprobs_bwd_cuda"),
        "triton": _k("triton.logprobs:logprobs_fwd", "triton.logprobs:logprobs_bwd",
                     dtypes=NO_FLOAT64),
        "cpu": _k("_C:logprobs_fwd_cpu", "_C:logprobs_bwd_cpu"),
        "torch": _k("reference.logprobs:logprobs_fwd", "reference.logprobs:logprobs_bwd")},
    "decode_attention": {
        "cuda": _k("_C:decode_attention_cuda", dtypes=NO_FLOAT64,
                   head_dims=DECODE_CUDA_HEAD_DIMS, wrap="ops.decode:realign_16_bytes"),
        "triton": _k("triton.decode_attention:decode_attention", dtypes=NO_FLOAT64),
        "cpu": _k("_C:decode_attention_cpu"),
        "torch": _k("reference.decode_attention:decode_attention_kernel")},
    "sample": {"cuda": _k("_C:sample_cuda", dtypes=NO_FLOAT64),
               "triton": _k("triton.sample:sample", dtypes=NO_FLOAT64),
               "cpu": _k("_C:sample_cpu"), "torch": _k("ops.decode:torch_sample")},
    # the decoder-layer ops of the generation adapters' forwards: CPU kernels; GPUs run torch's
    "rms_norm": {"cpu": _k("_C:rms_norm_cpu", "_C:rms_norm_backward_cpu", dtypes=FLOAT32),
                 "torch": _k("reference.rms_norm:rms_norm")},
    "rope": {"cpu": _k("_C:rope_cpu", dtypes=FLOAT32), "torch": _k("reference.rope:rotate")},
    "swiglu": {"cpu": _k("_C:swiglu_cpu", "_C:swiglu_backward_cpu", dtypes=FLOAT32),
               "torch": _k("reference.swiglu:swiglu")},
    "skinny_linear": {"cpu": _k("_C:skinny_linear_cpu", dtypes=FLOAT32),
                      "torch": _k("torch.nn.functional:linear")},
}


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


class _Missing(Exception):
    """An entry point that cannot be loaded here; the message says why."""


def _load(spec: str):
    where, name = spec.split(":")
    if where == "_C":
        ext, why = extension()
        if ext is None:
            raise _Missing(why)
        if not hasattr(ext, name):
            if name.endswith("_cuda"):
                raise _Missing("the extension was built without CUDA "
                               f"({ext.build_info.get('cuda_reason', '?')}); rebuild with "
                               "RLHF_KERNELS_CUDA=1")
            raise _Missing(f"the extension has no {name}; rebuild it")
        return getattr(ext, name)
    if where.startswith("triton."):
        ok, why = triton_status()
        if not ok:
            raise _Missing(why)
    module = where if where.startswith("torch.") else f"rlhf_kernels.{where}"
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def _entries(op: str, backend: str):
    """(loaded entry points, None) or (None, the reason they cannot be loaded)."""
    spec = TABLE[op][backend]
    try:
        loaded = tuple(_load(s) for s in spec.entries)
    except _Missing as e:
        return None, str(e)
    if spec.wrap is not None:
        loaded = _load(spec.wrap)(*loaded)
    return loaded, None


def kernel(op: str, backend: str):
    """The entry points of `op` on `backend` (a tuple: forward[, backward]); raises
    BackendUnavailable when they are not built here."""
    loaded, why = _entries(op, backend)
    if loaded is None:
        hint = "pip install triton" if backend == "triton" else BUILD_HINT
        raise BackendUnavailable(f"{op}: backend {backend!r} is not available: {why}; {hint}")
    return loaded


def kernel_status(op: str, backend: str):
    """(available, reason) for `op` on `backend`, regardless of the device of any tensor."""
    if backend not in TABLE.get(op, {}):
        return False, f"{op} has no {backend} kernel"
    loaded, why = _entries(op, backend)
    if loaded is None:
        return False, why
    if backend == "triton" and not torch.cuda.is_available() and not triton_interpret():
        return True, "no CUDA device: runs CPU tensors only with TRITON_INTERPRET=1"
    if backend == "cuda" and not torch.cuda.is_available():
        return True, "built, but no CUDA device is visible"
    return True, None


def declines(op: str, backend: str, dtype=None, head_dim=None) -> Optional[str]:
    """Why the `backend` kernel of `op` does not serve inputs of this dtype (or tuple of the
    dtypes of its inputs) / head dim, or None when it does (None facts are not checked)."""
    spec = TABLE[op][backend]
    for d in dtype if isinstance(dtype, tuple) else (dtype,):
        if d is not None and d not in spec.dtypes:
            names = " / ".join(str(t).replace("torch.", "") for t in spec.dtypes)
            return f"it takes {names} tensors, got {str(d).replace('torch.', '')}"
    if head_dim is not None and spec.head_dims is not None and head_dim not in spec.head_dims:
        return f"it is built for head dims {spec.head_dims}, got {head_dim}"
    return None


_warned: set = set()


def _once(key, report: Callable[[], None]) -> None:
    if key not in _warned:
        _warned.add(key)
        report()


def _check_device(backend: str, device: torch.device) -> None:
    on_cuda = device.type == "cuda"
    if backend == "cuda" and not on_cuda:
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "triton" and not on_cuda and not triton_interpret():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                         f"tensors), got tensors on {device}")


def _auto(op: str, device: torch.device, dtype, head_dim) -> str:
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
    order = [b for b in order if b in TABLE[op]]
    for i, name in enumerate(order):
        ok, why = kernel_status(op, name)
        if not ok:
            if i == 0:
                _once((op, name), lambda: warnings.warn(
                    f"rlhf_kernels: {op} falls back from the {name} backend: {why}. "
                    f"{BUILD_HINT}.", RuntimeWarning, stacklevel=5))
            continue
        why = declines(op, name, dtype, head_dim)
        if why is None:
            return name
        _once((op, name, why), lambda: log.info("rlhf_kernels: %s does not run on the %s "
                                                "backend here (%s)", op, name, why))
    raise AssertionError("unreachable: torch serves every input")


def choose(op: str, backend: str, device: torch.device, dtype=None, head_dim=None) -> str:
    """The backend that runs `op` on tensors of `device` and `dtype` (and head dim, for decode
    attention): `auto` decided as the module docstring says, an explicit name checked."""
    if backend not in ("auto",) + tuple(TABLE[op]):
        raise ValueError(f"{op}: backend must be one of {('auto',) + tuple(TABLE[op])}, got "
                         f"{backend!r}")
    if backend == "auto":
        return _auto(op, device, dtype, head_dim)
    _check_device(backend, device)
    kernel(op, backend)  # BackendUnavailable when it is not built
    why = declines(op, backend, dtype, head_dim)
    if why is not None:
        raise BackendUnavailable(f"{op}: backend {backend!r} cannot serve these inputs: {why}; "
                                 "use backend='auto' or 'torch'")
    return backend


def resolve(op: str, backend: str, device: torch.device, dtype=None) -> str:
    """choose() without shape facts (the name other modules have used)."""
    return choose(op, backend, device, dtype)
