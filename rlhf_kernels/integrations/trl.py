"""Drop-in rlhf_kernels for TRL (written against trl 1.16).

    from rlhf_kernels.integrations import trl
    trl.patch()     # -> ["trl.trainer.utils.selective_log_softmax -> rlhf_kernels.logprobs", ...]
    trl.unpatch()

What is replaced (and every `from ... import` copy of it inside trl):

- `trl.trainer.utils.selective_log_softmax`, `entropy_from_logits` and
  `selective_log_softmax_and_entropy` -> `rlhf_kernels.logprobs` (one pass for both outputs).
  Same arguments, same `row_mask` rule (skipped rows give 0 and may hold any label), same
  output dtype as TRL on that device: float32 where TRL would run its own Triton kernel
  (CUDA / XPU), else the logits dtype. The K-labels-per-row form of `selective_log_softmax`
  goes to TRL's own code.
- `trl.kernels.chunked_logprob.ChunkedLogProbFunction` (the fused LM head of GRPO, RLOO,
  SFT, DPO and KTO: `model(..., fused_lm_head=True)`) -> `rlhf_kernels.fused_linear_logprobs`
  when only log-probs and entropy are asked for, without bias, logit soft-capping or logit
  scale, and the head is not a ZeRO-3 partitioned parameter; TRL's own code otherwise.

trl 1.x has no PPO trainer, GAE loop, whitening helper or standalone PPO loss function, so
there is nothing for `rlhf_kernels.gae` or the PPO loss ops to replace here.
"""
from __future__ import annotations

import inspect
import sys
from typing import List

import torch

from .. import fused_linear_logprobs
from ._adapters import entropy_only, is_float, is_logits, positive, same_shape, token_logprobs
from ._patching import Patcher, Target, wraps

__all__ = ["patch", "unpatch", "is_patched"]

_UTILS = "trl.trainer.utils"
_FUSED_HEAD_OUTPUTS = {"log_probs", "entropy"}


def _trl_output_dtype(logits, index=None, row_mask=None) -> torch.dtype:
    """float32 where TRL would use its Triton kernel on these inputs, else the logits dtype."""
    utils = sys.modules.get(_UTILS)
    supports = getattr(utils, "_supports_trl_loss_kernel", None)
    triton_ok = getattr(utils, "is_triton_available", lambda: False)
    if supports is not None and triton_ok() and supports(logits, index, row_mask):
        return torch.float32
    return logits.dtype


def _logprobs_with_row_mask(logits, index, temperature, row_mask, with_entropy):
    keep = None if row_mask is None else row_mask != 0
    if keep is not None:
        index = torch.where(keep, index, torch.zeros_like(index))  # skipped rows: any label
    logp, entropy = token_logprobs(logits, index, temperature=float(temperature),
                                   with_entropy=with_entropy)
    dtype = _trl_output_dtype(logits, index, row_mask)
    if keep is not None:
        logp = logp.masked_fill(~keep, 0.0)
        entropy = None if entropy is None else entropy.masked_fill(~keep, 0.0)
    return logp.to(dtype), None if entropy is None else entropy.to(dtype)


def _handles(logits, index, temperature, row_mask) -> bool:
    return (is_logits(logits, index) and positive(temperature)
            and (row_mask is None or same_shape(index.shape, row_mask)))


def _selective_log_softmax(original):
    @wraps(original)
    def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
        if not _handles(logits, index, temperature, row_mask):
            return original(logits, index, temperature, row_mask)
        return _logprobs_with_row_mask(logits, index, temperature, row_mask, False)[0]
    return selective_log_softmax


def _selective_log_softmax_and_entropy(original):
    @wraps(original)
    def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True,
                                          temperature=1.0, row_mask=None):
        if not _handles(logits, index, temperature, row_mask):
            return original(logits, index, entropy_requires_grad, temperature, row_mask)
        logp, entropy = _logprobs_with_row_mask(logits, index, temperature, row_mask, True)
        return logp, entropy if entropy_requires_grad else entropy.detach()
    return selective_log_softmax_and_entropy


def _entropy_from_logits(original):
    @wraps(original)
    def entropy_from_logits(logits, chunk_size=128):
        if not is_logits(logits):
            return original(logits, chunk_size)
        return entropy_only(logits).to(_trl_output_dtype(logits))
    return entropy_from_logits


def _fused_head_handles(a) -> bool:
    hidden, weight, targets = a["hidden"], a["weight"], a["targets"]
    return (a["bias"] is None and a["final_logit_softcapping"] is None
            and float(a["logit_scale"]) == 1.0 and set(a["outputs"]) <= _FUSED_HEAD_OUTPUTS
            and positive(a["temperature"]) and positive(a["chunk_size"])
            and is_float(hidden, weight)
            and hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
            and weight.device == hidden.device and is_logits(hidden, targets)
            and type(weight) in (torch.Tensor, torch.nn.Parameter)  # not a DTensor
            and not hasattr(weight, "ds_id"))  # ZeRO-3: TRL re-gathers it in backward


def _chunked_logprob_function(original):
    """A stand-in class whose `apply` takes ChunkedLogProbFunction.apply's arguments."""
    params = list(inspect.signature(original.forward).parameters.values())[1:]  # drop ctx
    signature = inspect.Signature(params)
    trl_tokens = getattr(sys.modules.get(original.__module__), "TOKEN_CHUNK_SIZE", 4096)

    def tokens_per_chunk(vocab_chunk, vocab):
        # TRL's peak is one [trl_tokens, vocab_chunk] logits tile; ours is [tokens, vocab]
        return max(1, trl_tokens * min(int(vocab_chunk), vocab) // vocab)

    def apply(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if not _fused_head_handles(a):
            return original.apply(*args, **kwargs)
        hidden, weight = a["hidden"], a["weight"]
        device = hidden.device.type
        # TRL projects in the autocast dtype when autocast is on; so do we, with autocast off
        # inside so that forward and backward see one dtype
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else hidden.dtype)
        with_entropy = "entropy" in a["outputs"]
        chunk = tokens_per_chunk(a["chunk_size"], weight.shape[0])
        with torch.autocast(device, enabled=False):
            out = fused_linear_logprobs(hidden.to(dtype), weight.to(dtype), a["targets"],
                                        temperature=float(a["temperature"]),
                                        return_entropy=with_entropy, chunk_size=chunk)
        logp, entropy = out if with_entropy else (out, None)
        # TRL's outputs are float32 whatever the dtype
        return logp.float(), None if entropy is None else entropy.float(), None, None, None

    apply.__signature__ = signature
    return type(original.__name__, (), {
        "apply": staticmethod(apply), "__module__": original.__module__,
        "__qualname__": original.__qualname__, "__doc__": original.__doc__,
        "__wrapped__": original})


TARGETS = (
    Target(_UTILS, "selective_log_softmax", "rlhf_kernels.logprobs", _selective_log_softmax),
    Target(_UTILS, "entropy_from_logits", "rlhf_kernels.logprobs(return_entropy=True)",
           _entropy_from_logits),
    Target(_UTILS, "selective_log_softmax_and_entropy",
           "rlhf_kernels.logprobs(return_entropy=True)", _selective_log_softmax_and_entropy),
    Target("trl.kernels.chunked_logprob", "ChunkedLogProbFunction",
           "rlhf_kernels.fused_linear_logprobs", _chunked_logprob_function),
)

_PATCHER = Patcher("trl", TARGETS, pip_name="trl")


def patch() -> List[str]:
    """Replace TRL's log-prob / entropy functions by rlhf_kernels ops (idempotent).

    Returns:
        One "where -> op" line per replaced reference (also logged at INFO).

    Raises:
        ImportError: trl (or one of its dependencies) is not installed.
    """
    return _PATCHER.patch()


def unpatch() -> List[str]:
    """Put TRL's original functions back; returns the names restored."""
    return _PATCHER.unpatch()


def is_patched() -> bool:
    return _PATCHER.is_patched
