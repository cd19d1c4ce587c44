"""Rollout -> experience: everything the updates need, computed once under torch.no_grad().

An `Experience` holds B sequences of a LEFT padded prompt (P tokens) and N response tokens
with, per response token, the log-probs of the policy that sampled it and of the reference,
the critic's values, the rewards, advantages and returns.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import rlhf_kernels

from .model_forward import check_sequences, response_logits, response_values
from .nonfinite import check_finite


@dataclass
class Experience:
    """One batch of rollouts. Per-row tensors share the batch dim B; None = not computed.

    Attributes:
        sequences: [B, P+N] token ids: left padded prompt, then the response.
        attention_mask: [B, P+N], 1 on real prompt tokens and on response tokens up to EOS.
        action_mask: [B, N] bool, True on response tokens up to and including EOS.
        prompt_len: P.
        old_logprobs: [B, N] float32 log-probs under the policy that sampled the tokens.
        ref_logprobs: [B, N] under the reference model (None without one).
        values: [B, N] critic values of the state before each response token (None w/o critic).
        scores: [B] float32 sequence scores from the reward.
        rewards, advantages, returns: [B, N] float32 (returns None where unused).
    """
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    prompt_len: int
    old_logprobs: torch.Tensor
    ref_logprobs: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    rewards: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None

    def __post_init__(self):
        n = check_sequences(self.sequences, self.attention_mask, self.prompt_len)
        batch = self.sequences.shape[0]
        for name, value in self._tensors():
            want = (batch,) if name == "scores" else (batch, n)
            if name not in ("sequences", "attention_mask") and tuple(value.shape) != want:
                raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")

    def _tensors(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                yield f.name, value

    def _map(self, fn) -> Experience:
        """The same experience with `fn` applied to every tensor (row selection, device moves):
        shapes were checked when it was made, so the copy is not checked again."""
        out = copy.copy(self)
        for name, t in self._tensors():
            setattr(out, name, fn(t))
        return out

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    @property
    def responses(self) -> torch.Tensor:
        """[B, N] response token ids."""
        return self.sequences[:, self.prompt_len:]

    def to(self, device) -> Experience:
        return self._map(lambda t: t.to(device))

    def select(self, rows) -> Experience:
        """The experience of the given rows (index tensor, list or slice)."""
        return self._map(lambda t: t[rows])

    def split(self, micro_batch_size: int, generator: torch.Generator = None
              ) -> list[Experience]:
        """Minibatches of micro_batch_size rows (the last may be smaller); rows are shuffled
        when a generator is given. Whole groups are not kept together: the advantages are
        already computed."""
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) \
                or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be an integer >= 1, got "
                             f"{micro_batch_size!r}")
        order = (torch.randperm(self.batch_size, generator=generator) if generator is not None
                 else torch.arange(self.batch_size))
        order = order.to(self.sequences.device)
        return [self.select(order[i:i + micro_batch_size])
                for i in range(0, self.batch_size, micro_batch_size)]


def response_logprobs(model, sequences, attention_mask, prompt_len: int, temperature=1.0,
                      return_entropy=False):
    """Log-probs [B, N] float32 of the response tokens sequences[:, P:] under a causal LM at
    `temperature` (and their entropy when return_entropy). Differentiable; wrap in
    torch.no_grad() for rollouts."""
    logits = response_logits(model, sequences, attention_mask, prompt_len)
    return rlhf_kernels.logprobs(logits, sequences[:, prompt_len:], temperature=temperature,
                                 return_entropy=return_entropy)


def rollouts_to_keep(response_mask: torch.Tensor, min_tokens: int, group_size: int = 1
                     ) -> torch.Tensor:
    """Row indices of the rollouts with at least `min_tokens` response tokens (EOS included);
    with group_size > 1, consecutive rows form a group and a group is kept only whole (its
    baseline needs every sample). DeepSpeed-Chat's rule is min_tokens = 2."""
    long_enough = (response_mask != 0).sum(dim=1) >= min_tokens
    if group_size > 1:
        long_enough = long_enough.view(-1, group_size).all(dim=1).repeat_interleave(group_size)
    return long_enough.nonzero().squeeze(1)


def _checked_scores(scores, batch: int, device) -> torch.Tensor:
    scores = torch.as_tensor(scores, dtype=torch.float32, device=device)
    if scores.shape != (batch,):
        raise ValueError(f"the reward function must return [B] = ({batch},) scores, got shape "
                         f"{tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"the reward function returned non-finite scores: {scores.tolist()}")
    return scores


@torch.no_grad()
def make_experience(generation, prompt_mask, *, actor, reference, reward_fn: Callable,
                    algorithm, hp, critic=None, use_behaviour_logprobs=False) -> Experience:
    """Score one batch of rollouts and compute its rewards, advantages and returns.

    Args:
        generation: has `sequences` [B, P+N], `response_mask` [B, N] and `logprobs` [B, N]
            (the behaviour log-probs at the sampling temperature), as
            rlhf_kernels.generation.generate returns.
        prompt_mask: [B, P] attention mask of the left padded prompts.
        actor, reference: causal LMs (or engines); reference may be None when hp.kl_ctl is 0.
        reward_fn: fn(sequences, attention_mask, action_mask) -> scores [B].
        algorithm: an entry of rlhf.algorithms.ALGORITHMS.
        hp: RLHParams.
        critic: critic(input_ids, attention_mask) -> values [B, T]; needed by algorithms with
            needs_critic.
        use_behaviour_logprobs: take old_logprobs from the generation instead of recomputing
            them with a forward of the actor (a forward matches the training numerics: before
            any optimizer step the ratio is exactly 1, without dropout).

    Models are called in whatever train / eval mode the caller left them.
    """
    _check_inputs(generation, prompt_mask, algorithm, critic, reference, hp)
    sequences, prompt_len = generation.sequences, prompt_mask.shape[1]
    action_mask = generation.response_mask != 0
    attention_mask = torch.cat([prompt_mask.long(), action_mask.long()], dim=1)
    args = (sequences, attention_mask, prompt_len)
    if use_behaviour_logprobs:
        if getattr(generation, "logprobs", None) is None:
            raise ValueError("use_behaviour_logprobs needs generation.logprobs")
        old = generation.logprobs
    else:
        old = response_logprobs(actor, *args, temperature=hp.temperature)
    check_finite("the policy's log-probs are", old, action_mask, DIVERGED_ACTOR)
    ref = values = None
    if reference is not None:
        ref = response_logprobs(reference, *args, temperature=hp.temperature)
        check_finite("the reference model's log-probs are", ref, action_mask,
                     "the reference is the frozen SFT model: check model.dtype and its weights")
    if algorithm.needs_critic:
        values = response_values(critic, *args)
        check_finite("the critic's values are", values, action_mask,
                     "the critic has diverged: lower rl.critic_lr or rl.cliprange_value")

    def masked(x):
        return None if x is None else torch.where(action_mask, x.float(), 0.0)

    exp = Experience(
        sequences, attention_mask, action_mask, prompt_len, old_logprobs=masked(old),
        ref_logprobs=masked(ref), values=masked(values),
        scores=_checked_scores(reward_fn(sequences, attention_mask, action_mask),
                               sequences.shape[0], sequences.device))
    exp.rewards = algorithm.rewards(exp, hp)
    exp.advantages, exp.returns = algorithm.advantages(exp, hp)
    return exp


DIVERGED_ACTOR = ("the actor has diverged: lower rl.actor_lr, check model.dtype (fp16 "
                   "overflows first) and rl.temperature")


def _check_inputs(generation, prompt_mask, algorithm, critic, reference, hp) -> None:
    sequences, response_mask = generation.sequences, generation.response_mask
    if prompt_mask.dim() != 2 or response_mask.dim() != 2 or sequences.shape != (
            prompt_mask.shape[0], prompt_mask.shape[1] + response_mask.shape[1]):
        raise ValueError(f"sequences {tuple(sequences.shape)} must be [B, P+N] for prompt_mask "
                         f"{tuple(prompt_mask.shape)} [B, P] and response_mask "
                         f"{tuple(response_mask.shape)} [B, N]")
    if algorithm.needs_critic and critic is None:
        raise ValueError(f"algorithm {algorithm.name!r} needs a critic")
    if reference is None and hp.kl_ctl != 0:
        raise ValueError(f"kl_ctl = {hp.kl_ctl} needs a reference model (or set kl_ctl to 0)")
