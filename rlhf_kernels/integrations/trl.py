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
- `trl.kernels.chunked_logprob.ChunkedLogProbFunction` (the fused LM head,
  `model(..., fused_lm_head=True)`) -> `rlhf_kernels.fused_linear_logprobs` when only
  log-probs and entropy are asked for (GRPO and RLOO; SFT, DPO and KTO ask for more outputs
  and keep TRL's code), without bias, logit soft-capping or logit scale, and the head is not
  a ZeRO-3 partitioned parameter; TRL's own code otherwise. The replacement is a subclass of
  TRL's autograd.Function with its own `apply`; TOKEN_CHUNK_SIZE is read at each call.

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
from ._patching import Decline, Patcher, Target, wraps

__all__ = ["patch", "unpatch", "is_patched", "skipped", "TESTED_VERSIONS"]

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


_FUSED_HEAD_PARAMS = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                      "final_logit_softcapping", "logit_scale", "outputs")
_FUSED_HEAD_SIGNATURE = ("ctx, hidden, weight, bias, targets, temperature, chunk_size, "
                         "final_logit_softcapping=None, logit_scale=1.0, outputs=()")


def _fused_head_handles(a) -> bool:
    hidden, weight, targets = a["hidden"], a["weight"], a["targets"]
    return (a["bias"] is None and a["final_logit_softcapping"] is None
            and positive(a["logit_scale"]) and float(a["logit_scale"]) == 1.0
            and isinstance(a["outputs"], (tuple, list, set, frozenset))
            and set(a["outputs"]) <= _FUSED_HEAD_OUTPUTS
            and positive(a["temperature"]) and positive(a["chunk_size"])
            and is_float(hidden, weight)
            and hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
            and weight.device == hidden.device and is_logits(hidden, targets)
            and type(weight) in (torch.Tensor, torch.nn.Parameter)  # not a DTensor
            and not hasattr(weight, "ds_id"))  # ZeRO-3: TRL re-gathers it in backward


def _fused_head_signature(original) -> inspect.Signature:
    """apply's signature (forward's without ctx); Decline unless forward names every argument
    we read as an ordinary parameter (a wrapper without functools.wraps does not)."""
    if not (isinstance(original, type) and issubclass(original, torch.autograd.Function)):
        raise Decline(f"{original!r} is not a torch.autograd.Function")
    try:
        params = list(inspect.signature(original.forward).parameters.values())[1:]  # no ctx
    except (TypeError, ValueError) as e:
        raise Decline(f"the signature of its forward cannot be read ({e})") from e
    plain = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [name for name in _FUSED_HEAD_PARAMS if name not in plain]
    if missing:
        raise Decline(f"its forward{inspect.signature(original.forward)} does not name "
                      f"{', '.join(missing)}")
    return inspect.Signature(params)


def _fused_head(a, token_chunk: int):
    """TRL's outputs from rlhf_kernels.fused_linear_logprobs, for arguments it handles."""
    hidden, weight = a["hidden"], a["weight"]
    device = hidden.device.type
    # TRL projects in the autocast dtype when autocast is on; so do we, with autocast off
    # inside so that forward and backward see one dtype
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else hidden.dtype)
    with_entropy = "entropy" in a["outputs"]
    vocab = weight.shape[0]
    # TRL's peak is one [token_chunk, vocab_chunk] logits tile; ours is [tokens, vocab]
    chunk = max(1, token_chunk * min(int(a["chunk_size"]), vocab) // vocab)
    with torch.autocast(device, enabled=False):
        out = fused_linear_logprobs(hidden.to(dtype), weight.to(dtype), a["targets"],
                                    temperature=float(a["temperature"]),
                                    return_entropy=with_entropy, chunk_size=chunk)
    logp, entropy = out if with_entropy else (out, None)
    # TRL's outputs are float32 whatever the dtype
    return logp.float(), None if entropy is None else entropy.float(), None, None, None


def _chunked_logprob_function(original):
    """A subclass of TRL's autograd.Function whose `apply` runs our op on the arguments it
    handles and TRL's own `apply` on anything else (so forward/backward stay TRL's)."""
    signature = _fused_head_signature(original)
    module = sys.modules.get(original.__module__)

    def apply(cls, *args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # not a call we understand: TRL raises its own error, if any
            return original.apply(*args, **kwargs)
        bound.apply_defaults()
        if not _fused_head_handles(bound.arguments):
            return original.apply(*args, **kwargs)
        # read at each call, as TRL does: a later change of the constant takes effect
        return _fused_head(bound.arguments, int(getattr(module, "TOKEN_CHUNK_SIZE", 4096)))

    cls_param = inspect.Parameter("cls", inspect.Parameter.POSITIONAL_ONLY)
    apply.__signature__ = signature.replace(parameters=[cls_param, *signature.parameters.values()])
    return type(original)(original.__name__, (original,), {
        "apply": classmethod(apply), "__module__": original.__module__,
        "__qualname__": original.__qualname__, "__doc__": original.__doc__,
        "__wrapped__": original})


# the versions the replacements are tested on (with the real package: tests/test_peer_versions.py
# pins one, and an older one); outside them a target is patched only when its signature
# is the one recorded below
TESTED_VERSIONS = ">=1.16,<1.17"

TARGETS = (
    Target(_UTILS, "selective_log_softmax", "rlhf_kernels.logprobs", _selective_log_softmax,
           "logits, index, temperature=1.0, row_mask=None"),
    Target(_UTILS, "entropy_from_logits", "rlhf_kernels.logprobs(return_entropy=True)",
           _entropy_from_logits, "logits, chunk_size=128"),
    Target(_UTILS, "selective_log_softmax_and_entropy",
           "rlhf_kernels.logprobs(return_entropy=True)", _selective_log_softmax_and_entropy,
           "logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None"),
    # trl.kernels is absent before TRL 1.14: this target alone is skipped there
    Target("trl.kernels.chunked_logprob", "ChunkedLogProbFunction",
           "rlhf_kernels.fused_linear_logprobs", _chunked_logprob_function,
           _FUSED_HEAD_SIGNATURE),
)

_PATCHER = Patcher("trl", TARGETS, pip_name="trl", tested=TESTED_VERSIONS)


def patch() -> List[str]:
    """Replace TRL's log-prob / entropy functions by rlhf_kernels ops (idempotent).

    Returns:
        One "where -> op" line per replaced reference (also logged at INFO).

    A target that is absent (trl.kernels before TRL 1.14), not of the shape its replacement
    reads (e.g. wrapped without functools.wraps), or, outside TESTED_VERSIONS, whose
    signature changed, is left alone: see `skipped()`.

    Raises:
        ImportError: trl itself (or one of its dependencies) is not installed.
    """
    return _PATCHER.patch()


def skipped() -> List[str]:
    """"target: why" for each target the last patch() left alone."""
    return _PATCHER.skipped


def unpatch() -> List[str]:
    """Put TRL's original functions back; returns the names restored."""
    return _PATCHER.unpatch()


def is_patched() -> bool:
    return _PATCHER.is_patched
