"""Drop-in rlhf_kernels for veRL (written against verl 0.9).

    from rlhf_kernels.integrations import verl
    verl.patch()    # -> ["verl.utils.torch_functional.logprobs_from_logits -> ...", ...]
    verl.unpatch()

What is replaced (and every `from ... import` copy or registry entry of it inside verl):

- `verl.utils.torch_functional.logprobs_from_logits` -> `rlhf_kernels.logprobs`. Output
  dtype as veRL's: float32 where it would use flash-attn's cross entropy, else the logits
  dtype. `inplace_backward` is accepted and not used: the gradient gets its own buffer, as
  other code (the entropy) may still need the logits in backward.
- `entropy_from_logits` (logits dtype) and `entropy_from_logits_with_chunking` (2-D logits,
  float32) -> `rlhf_kernels.logprobs(return_entropy=True)`.
- `verl.trainer.ppo.core_algos.compute_gae_advantage_return` (also ADV_ESTIMATOR_REGISTRY
  "gae") -> `rlhf_kernels.gae(mode="skip")`: veRL's recursion skips masked positions. As in
  veRL, a masked position carries the advantage of the next valid one (0 after the last),
  returns = advantages + values everywhere, and the advantages are whitened over the valid
  tokens (unbiased variance) at every position.
- `verl.trainer.ppo.core_algos.compute_value_loss` -> `rlhf_kernels.ppo_critic_loss`, every
  `loss_agg_mode` of veRL's `agg_loss` (global token / sample counts, dp_size, scale factor).

Inputs these ops cannot take as they are (float64 GAE, fewer than two valid tokens, gamma or
lambda outside [0, 1], non-finite values, a mask that is not 0/1, an unknown aggregation)
go to the original function, which also raises veRL's own errors. The policy losses and KL
penalties take log-probs, not logits: elementwise [B, T] formulas, left as they are.
"""
from __future__ import annotations

import os
import sys
from typing import List

import torch

from .. import gae, ppo_critic_loss
from ._adapters import (all_finite, entropy_only, is_binary, is_float, is_logits, nonnegative,
                        promoted, same_shape, token_logprobs, unit_interval)
from ._patching import Patcher, Target, wraps

__all__ = ["patch", "unpatch", "is_patched", "skipped", "TESTED_VERSIONS"]

_TORCH_FUNCTIONAL = "verl.utils.torch_functional"
_CORE_ALGOS = "verl.trainer.ppo.core_algos"
_SEQ_MODES = ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def _verl_logprobs_dtype(logits) -> torch.dtype:
    functional = sys.modules.get(_TORCH_FUNCTIONAL)
    flash = (getattr(functional, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)
             and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1")
    return torch.float32 if flash else logits.dtype


def _logprobs_from_logits(original):
    @wraps(original)
    def logprobs_from_logits(logits, labels, inplace_backward=True):
        if not is_logits(logits, labels):
            return original(logits, labels, inplace_backward)
        return token_logprobs(logits, labels)[0].to(_verl_logprobs_dtype(logits))
    return logprobs_from_logits


def _entropy_from_logits(original):
    @wraps(original)
    def entropy_from_logits(logits):
        if not is_logits(logits):
            return original(logits)
        return entropy_only(logits).to(logits.dtype)
    return entropy_from_logits


def _entropy_from_logits_with_chunking(original):
    @wraps(original)
    def entropy_from_logits_with_chunking(logits, chunk_size=2048):
        if not (is_logits(logits) and logits.dim() == 2):
            return original(logits, chunk_size)
        return entropy_only(logits).to(torch.get_default_dtype())
    return entropy_from_logits_with_chunking


def carry_back(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each masked position takes the value of the next valid position of its row (0 when
    there is none); valid positions keep theirs. x, valid [B, T]."""
    length = x.shape[-1]
    pos = torch.arange(length, device=x.device).expand_as(valid)
    nxt = torch.where(valid, pos, length).flip(-1).cummin(-1).values.flip(-1)
    carried = x.gather(-1, nxt.clamp(max=length - 1))
    return torch.where(nxt < length, carried, torch.zeros_like(carried))


def _compute_gae_advantage_return(original):
    @wraps(original)
    def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
        r, v, m = token_level_rewards, values, response_mask
        if not (is_float(r, v) and r.dim() == 2 and same_shape(r.shape, v, m)
                and m.dtype != torch.bool and is_binary(m) and unit_interval(gamma, lam)):
            return original(r, v, m, gamma, lam)  # (veRL itself rejects a bool mask)
        dtype = promoted(r, v, *([m] if m.is_floating_point() else []))
        valid = m.bool()
        if dtype == torch.float64 or int(valid.sum()) < 2 or not all_finite(r, v):
            return original(r, v, m, gamma, lam)
        with torch.no_grad():
            adv, _ = gae(r, v, valid, gamma=float(gamma), lam=float(lam), mode="skip")
            adv = carry_back(adv, valid)
            returns = adv + v.float()
            chosen = adv[valid]
            whitened = (adv - chosen.mean()) * torch.rsqrt(chosen.var(unbiased=True) + 1e-8)
        return whitened.to(dtype), returns.to(dtype)
    return compute_gae_advantage_return


def _value_loss_plan(mask, mode, dp_size, batch_num_tokens, global_batch_size,
                     loss_scale_factor):
    """(our agg, scale) with veRL's agg_loss = scale * ppo_critic_loss(agg), or None."""
    if mode in ("token-mean", "token-sum"):
        if mode == "token-mean" and batch_num_tokens is None and dp_size > 1:
            return None  # veRL raises: it needs the global count
        n = mask.sum()
        if mode == "token-sum":
            return "token-mean", n.clamp(min=1) * dp_size
        total = n if batch_num_tokens is None else batch_num_tokens
        return "token-mean", n.clamp(min=1) / total * dp_size
    if mode in _SEQ_MODES:
        if global_batch_size is None and dp_size > 1:
            return None
        rows = mask.any(dim=-1).sum() if global_batch_size is None else global_batch_size
        scale = mask.shape[0] / rows * dp_size  # ours: mean over all rows; veRL: over `rows`
        if mode == "seq-mean-token-mean":
            return mode, scale
        if mode == "seq-mean-token-sum-norm":
            scale = scale / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return "seq-mean-token-sum", scale
    return None


def _compute_value_loss(original):
    @wraps(original)
    def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value,
                           loss_agg_mode="token-mean", dp_size=1, batch_num_tokens=None,
                           global_batch_size=None, loss_scale_factor=None):
        args = (vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode, dp_size,
                batch_num_tokens, global_batch_size, loss_scale_factor)
        if not (is_float(vpreds) and vpreds.dim() == 2 and is_float(returns, values)
                and same_shape(vpreds.shape, returns, values, response_mask)
                and nonnegative(cliprange_value) and is_binary(response_mask)):
            return original(*args)
        mask = response_mask.bool()
        plan = _value_loss_plan(mask, loss_agg_mode, dp_size, batch_num_tokens,
                                global_batch_size, loss_scale_factor)
        if plan is None:
            return original(*args)
        agg, scale = plan
        out = ppo_critic_loss(vpreds, values, returns, mask, clip=float(cliprange_value),
                              agg=agg)
        float_mask = [response_mask] if response_mask.is_floating_point() else []
        loss_dtype = promoted(vpreds, returns, values, *float_mask)
        clipfrac_dtype = torch.float32  # veRL: a float32 0/1 mean, weighted by the mask
        if float_mask:
            clipfrac_dtype = torch.promote_types(clipfrac_dtype, response_mask.dtype)
        return (out.loss * scale).to(loss_dtype), out.clipfrac.to(clipfrac_dtype)
    return compute_value_loss


# the versions the replacements are tested on (with the real package: tests/test_peer_versions.py
# pins one, and an older one); outside them a target is patched only when its signature
# is the one recorded below
TESTED_VERSIONS = ">=0.9,<0.10"

TARGETS = (
    Target(_TORCH_FUNCTIONAL, "logprobs_from_logits", "rlhf_kernels.logprobs",
           _logprobs_from_logits, "logits, labels, inplace_backward=True"),
    Target(_TORCH_FUNCTIONAL, "entropy_from_logits",
           "rlhf_kernels.logprobs(return_entropy=True)", _entropy_from_logits, "logits"),
    Target(_TORCH_FUNCTIONAL, "entropy_from_logits_with_chunking",
           "rlhf_kernels.logprobs(return_entropy=True)", _entropy_from_logits_with_chunking,
           "logits, chunk_size=2048"),
    Target(_CORE_ALGOS, "compute_gae_advantage_return",
           'rlhf_kernels.gae(mode="skip", whitened as veRL)', _compute_gae_advantage_return,
           "token_level_rewards, values, response_mask, gamma, lam"),
    Target(_CORE_ALGOS, "compute_value_loss", "rlhf_kernels.ppo_critic_loss",
           _compute_value_loss, "vpreds, returns, values, response_mask, cliprange_value, "
           "loss_agg_mode='token-mean', dp_size=1, batch_num_tokens=None, "
           "global_batch_size=None, loss_scale_factor=None"),
)

_PATCHER = Patcher("verl", TARGETS, pip_name="verl", tested=TESTED_VERSIONS)


def patch() -> List[str]:
    """Replace veRL's log-prob, entropy, GAE and value-loss code by rlhf_kernels ops.

    Returns:
        One "where -> op" line per replaced reference (also logged at INFO). Idempotent.

    A target whose module does not import, that is absent, or, outside TESTED_VERSIONS, whose
    signature changed, is left alone: see `skipped()`.

    Raises:
        ImportError: verl itself cannot be imported; the message names the missing module.
            Nothing is patched then.
    """
    return _PATCHER.patch()


def skipped() -> List[str]:
    """"target: why" for each target the last patch() left alone."""
    return _PATCHER.skipped


def unpatch() -> List[str]:
    """Put veRL's original functions back; returns the names restored."""
    return _PATCHER.unpatch()


def is_patched() -> bool:
    return _PATCHER.is_patched
