"""Minibatch updates of the actor (and critic) on one Experience, with duck-typed engines.

An engine is what deepspeed.initialize returns: engine(...) runs the forward,
engine.backward(loss) scales by 1/gradient_accumulation_steps and backpropagates,
engine.step() steps the optimizer at accumulation boundaries. `TorchEngine` gives a plain
nn.Module + torch optimizer the same three calls.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch

from .experience import Experience
from .losses import actor_loss, critic_loss, ptx_loss
from .nonfinite import NonFiniteGuard


class TorchEngine:
    """A module and its optimizer behind DeepSpeed's engine calls.

    Args:
        module: the model; reachable as `.module` like a DeepSpeed engine's.
        optimizer: a torch optimizer over (some of) its parameters.
        gradient_accumulation_steps: micro steps per optimizer step.
        max_grad_norm: clip the gradient norm before each optimizer step (None: no clip).
        lr_scheduler: stepped after each optimizer step.
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 gradient_accumulation_steps: int = 1, max_grad_norm: Optional[float] = None,
                 lr_scheduler=None):
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got "
                             f"{gradient_accumulation_steps}")
        self.module, self.optimizer, self.lr_scheduler = module, optimizer, lr_scheduler
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.micro_steps = 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gradient_accumulation_steps).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the next step() steps the optimizer (DeepSpeed's name)."""
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.gradient_accumulation_steps:
            return
        if self.max_grad_norm is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)


def _actor_update(actor_engine, mb, algorithm, hp, ptx_batch, guard) -> dict[str, torch.Tensor]:
    loss, stats = actor_loss(actor_engine, mb, hp, algorithm)
    if ptx_batch is not None:
        ptx = ptx_loss(actor_engine, ptx_batch)
        loss = loss + hp.ptx_coef * ptx
        stats["ptx_loss"] = ptx.detach()
    if not guard.backward_and_step(actor_engine, loss, "actor"):
        stats["skipped_updates"] = 1.0
    return stats


def _critic_update(critic_engine, mb, hp, guard) -> dict[str, torch.Tensor]:
    loss, stats = critic_loss(critic_engine, mb, hp)
    if not guard.backward_and_step(critic_engine, loss, "critic"):
        stats["skipped_critic_updates"] = 1.0
    return stats


def train_step(actor_engine, critic_engine, experience: Experience, algorithm, hp, *,
               ptx_batches: Optional[Sequence] = None,
               generator: Optional[torch.Generator] = None,
               guard: Optional[NonFiniteGuard] = None) -> dict[str, float]:
    """hp.ppo_epochs passes over the experience in minibatches of hp.train_batch_size rows;
    each minibatch updates the actor, then the critic when the algorithm has one.

    Args:
        actor_engine, critic_engine: engines (critic_engine unused and may be None when
            algorithm.needs_critic is False).
        experience: with advantages (and values, returns for a critic).
        algorithm: an entry of ALGORITHMS (decides the loss's KL term).
        hp: RLHParams.
        ptx_batches: pretraining batches cycled one per minibatch; their loss, times
            hp.ptx_coef, is added to the actor loss (one backward and one optimizer step, where
            DeepSpeed-Chat takes a second step for it).
        generator: shuffles the rows of each epoch when given.
        guard: skips (and counts) updates whose loss or gradient is non-finite, raising after
            its limit in a row (kept by the caller across steps; default: skip, never raise).

    Returns:
        The mean over minibatches of each stat (actor_loss, clipfrac, approx_kl, entropy,
        ratio, kl, and critic_loss, critic_clipfrac, values, ptx_loss where they apply), and
        the counts skipped_updates / skipped_critic_updates when an update was skipped.
    """
    if algorithm.needs_critic and critic_engine is None:
        raise ValueError(f"algorithm {algorithm.name!r} needs a critic engine")
    if experience.advantages is None:
        raise ValueError("the experience has no advantages: run make_experience (or "
                         "algorithm.advantages) first")
    guard = NonFiniteGuard(limit=0) if guard is None else guard
    totals: dict[str, torch.Tensor] = defaultdict(float)
    updates = 0
    for _ in range(hp.ppo_epochs):
        for mb in experience.split(hp.train_batch_size, generator):
            ptx = ptx_batches[updates % len(ptx_batches)] if ptx_batches else None
            stats = _actor_update(actor_engine, mb, algorithm, hp, ptx, guard)
            if algorithm.needs_critic:
                stats.update(_critic_update(critic_engine, mb, hp, guard))
            for name, value in stats.items():
                totals[name] = totals[name] + value
            updates += 1
    counts = ("skipped_updates", "skipped_critic_updates")
    # one host sync at the end, not one per stat per minibatch
    return {name: float(total) / (1 if name in counts else updates)
            for name, total in totals.items()}
