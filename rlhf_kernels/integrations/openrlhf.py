"""Drop-in rlhf_kernels for OpenRLHF (written against openrlhf 0.11).

    from rlhf_kernels.integrations import openrlhf
    openrlhf.patch()    # -> ["openrlhf.models.utils.log_probs_from_logits -> ...", ...]
    openrlhf.unpatch()

What is replaced (and every `from ... import` copy of it inside openrlhf):

- `openrlhf.models.utils.log_probs_from_logits` -> `rlhf_kernels.logprobs`. As the original,
  a temperature != 1 divides the logits in place first; the result has the logits dtype.
- `openrlhf.models.utils.compute_entropy` -> `rlhf_kernels.logprobs(return_entropy=True)`.
- `RemoteExperienceMaker.get_advantages_and_returns` (trainer.ppo_utils.experience_maker) ->
  `rlhf_kernels.gae(mode="zero")`. OpenRLHF multiplies rewards and values by the mask and runs
  the recursion over every position, masked ones included (they are not zeroed afterwards), so
  the op runs on the masked inputs with no mask, which is that recursion exactly.
- `openrlhf.models.loss.ValueLoss.forward` -> `rlhf_kernels.ppo_critic_loss`, with OpenRLHF's
  aggregation (token or sequence level, global token / sample counts, dp_size) as a scale.

Inputs these ops cannot take as they are (float64 GAE, gamma or lambda outside [0, 1],
non-finite values, no value clip, a mask that is not 0/1) go to the original function.
The policy loss and the KL helpers take log-probs, not logits: they are elementwise [B, T]
formulas with nothing for a kernel to fuse, and stay as they are.
"""
from __future__ import annotations

from typing import List

import torch

from .. import gae, ppo_critic_loss
from ._adapters import (all_finite, entropy_only, is_binary, is_float, is_logits, nonnegative,
                        positive, promoted, same_shape, token_logprobs, unit_interval)
from ._patching import Patcher, Target, wraps

__all__ = ["patch", "unpatch", "is_patched", "skipped", "TESTED_VERSIONS"]


def _log_probs_from_logits(original):
    @wraps(original)
    def log_probs_from_logits(logits, labels, temperature=1.0):
        if not (is_logits(logits, labels) and positive(temperature)):
            return original(logits, labels, temperature)
        if temperature != 1.0:
            logits.div_(temperature)  # callers may rely on the scaled logits afterwards
        return token_logprobs(logits, labels)[0].to(logits.dtype)
    return log_probs_from_logits


def _compute_entropy(original):
    @wraps(original)
    def compute_entropy(logits):
        if not is_logits(logits):
            return original(logits)
        return entropy_only(logits).to(logits.dtype)
    return compute_entropy


def _gae_handles(values, rewards, action_mask, gamma, lambd) -> bool:
    return (is_float(values, rewards) and values.dim() == 2
            and same_shape(values.shape, rewards)
            and (action_mask is None or same_shape(values.shape, action_mask))
            and unit_interval(gamma, lambd))


def _get_advantages_and_returns(original):
    @wraps(original)
    def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
        if not _gae_handles(values, rewards, action_mask, gamma, lambd):
            return original(self, values, rewards, action_mask, gamma, lambd)
        with torch.no_grad():
            v, r = (values, rewards) if action_mask is None else (action_mask * values,
                                                                  action_mask * rewards)
            dtype = promoted(v, r)
            if dtype == torch.float64 or not all_finite(v, r):  # the op computes in float32
                return original(self, values, rewards, action_mask, gamma, lambd)
            adv, ret = gae(r, v, None, gamma=float(gamma), lam=float(lambd), mode="zero")
        return adv.to(dtype), ret.to(dtype)
    return get_advantages_and_returns


def _value_loss_handles(clip, values, old_values, returns, action_mask) -> bool:
    return (nonnegative(clip) and is_float(values)
            and values.dim() == 2 and is_float(old_values, returns)
            and same_shape(values.shape, old_values, returns, action_mask)
            and is_binary(action_mask))


def _value_loss_forward(original):
    @wraps(original)
    def forward(self, values, old_values, returns, action_mask=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None):
        if not _value_loss_handles(self.clip_eps, values, old_values, returns, action_mask):
            return original(self, values, old_values, returns, action_mask, dp_size,
                            batch_num_tokens, global_batch_size)
        mask = action_mask.bool()
        if self.token_level_loss:  # the op: sum(l*m) / max(n, 1)
            n = mask.sum()
            denominator = n if batch_num_tokens is None else batch_num_tokens / dp_size
            scale = n.clamp(min=1) / denominator
        else:  # the op: mean over all B rows; OpenRLHF: over the rows with a valid token
            rows = mask.any(dim=-1).sum()
            denominator = rows if global_batch_size is None else global_batch_size / dp_size
            scale = mask.shape[0] / denominator
        loss = ppo_critic_loss(values, old_values, returns, mask, clip=float(self.clip_eps),
                               agg="token-mean" if self.token_level_loss
                               else "seq-mean-token-mean").loss
        dtype = promoted(values, old_values, returns,
                         *([action_mask] if action_mask.is_floating_point() else []))
        return (loss * scale).to(dtype)
    return forward


# the versions the replacements are tested on (with the real package: tests/test_peer_versions.py
# pins one, and an older one); outside them a target is patched only when its signature
# is the one recorded below
TESTED_VERSIONS = ">=0.11,<0.12"

TARGETS = (
    Target("openrlhf.models.utils", "log_probs_from_logits", "rlhf_kernels.logprobs",
           _log_probs_from_logits, "logits, labels, temperature=1.0"),
    Target("openrlhf.models.utils", "compute_entropy",
           "rlhf_kernels.logprobs(return_entropy=True)", _compute_entropy, "logits"),
    # experience_maker imports vllm / ray: without them this target alone is skipped
    Target("openrlhf.trainer.ppo_utils.experience_maker",
           "RemoteExperienceMaker.get_advantages_and_returns", 'rlhf_kernels.gae(mode="zero")',
           _get_advantages_and_returns, "self, values, rewards, action_mask, gamma, lambd"),
    Target("openrlhf.models.loss", "ValueLoss.forward", "rlhf_kernels.ppo_critic_loss",
           _value_loss_forward, "self, values, old_values, returns, action_mask=None, "
           "dp_size=1, batch_num_tokens=None, global_batch_size=None"),
)

_PATCHER = Patcher("openrlhf", TARGETS, pip_name="openrlhf", tested=TESTED_VERSIONS)


def patch() -> List[str]:
    """Replace OpenRLHF's log-prob, entropy, GAE and value-loss code by rlhf_kernels ops.

    Returns:
        One "where -> op" line per replaced reference (also logged at INFO). Idempotent.

    A target whose module does not import (experience_maker needs vllm), that is absent, or,
    outside TESTED_VERSIONS, whose signature changed, is left alone: see `skipped()`.

    Raises:
        ImportError: openrlhf itself cannot be imported; the message names the missing
            module. Nothing is patched then.
    """
    return _PATCHER.patch()


def skipped() -> List[str]:
    """"target: why" for each target the last patch() left alone."""
    return _PATCHER.skipped


def unpatch() -> List[str]:
    """Put OpenRLHF's original functions back; returns the names restored."""
    return _PATCHER.unpatch()


def is_patched() -> bool:
    return _PATCHER.is_patched
