"""Input checks and shape adapters shared by the integrations.

A replacement runs an rlhf_kernels op only on inputs whose meaning it can keep exactly; the
predicates here decide that (anything else goes to the original function).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

from .. import logprobs as _logprobs

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def is_float(*xs) -> bool:
    """Every x is a non-empty floating tensor."""
    return all(isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES and x.numel() > 0
               for x in xs)


def is_logits(logits, index=None) -> bool:
    """logits [..., V] (V >= 1) and, if given, one integer label per row: index [...] with at
    least one leading dim (the trainers' own code mishandles 1-D logits with a 0-d label)."""
    if not is_float(logits) or logits.dim() < (1 if index is None else 2):
        return False
    if index is None:
        return True
    return (isinstance(index, torch.Tensor) and index.dtype in INDEX_DTYPES
            and index.shape == logits.shape[:-1] and index.device == logits.device)


def same_shape(shape, *xs) -> bool:
    return all(isinstance(x, torch.Tensor) and x.shape == shape for x in xs)


def is_binary(mask) -> bool:
    """A bool mask, or a numeric one holding only 0 and 1 (weights are not masks)."""
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        return False
    return mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all())


def all_finite(*xs) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in xs)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # None, strings, tensors of many elements
        return math.nan


def unit_interval(*values) -> bool:
    """Every value (a number or a 0-d tensor) is in [0, 1]."""
    return all(0.0 <= _number(v) <= 1.0 for v in values)


def positive(value) -> bool:
    v = _number(value)
    return v > 0 and math.isfinite(v)


def nonnegative(value) -> bool:
    v = _number(value)
    return v >= 0 and math.isfinite(v)


def promoted(*xs) -> torch.dtype:
    """The dtype torch's type promotion gives an expression over these tensors."""
    return functools.reduce(torch.promote_types, [x.dtype for x in xs])


def token_logprobs(logits: torch.Tensor, index: torch.Tensor, *, temperature: float = 1.0,
                   with_entropy: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """rlhf_kernels.logprobs over any number of leading dims: logits [..., V], index [...]
    -> (logp [...], entropy [...] or None), float32 (float64 for float64 logits)."""
    lead = logits.shape[:-1]
    if logits.dim() not in (2, 3):  # the op takes [B, T, V] (any strides) or [N, V]
        logits, index = logits.reshape(-1, logits.shape[-1]), index.reshape(-1)
    out = _logprobs(logits, index, temperature=temperature, return_entropy=with_entropy)
    logp, entropy = out if with_entropy else (out, None)
    return logp.reshape(lead), None if entropy is None else entropy.reshape(lead)


def entropy_only(logits: torch.Tensor) -> torch.Tensor:
    """Entropy [...] of logits [..., V] (the label-0 log-prob computed beside it is free)."""
    index = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return token_logprobs(logits, index, with_entropy=True)[1]
