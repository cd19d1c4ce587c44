"""Non-finite losses and gradients: skipped and counted, never applied, never silent.

DeepSpeed's fp16 loss scaler skips a step whose gradients overflow; in fp32 and bf16 nothing
does, and one NaN update makes every later step NaN. `NonFiniteGuard.backward_and_step` runs an
engine's backward and step only for a finite loss (and, where the gradients live on this rank,
finite gradients at the accumulation boundary); a skipped micro-batch is not back-propagated and
does not count toward the accumulation, so the optimizer and the learning-rate schedule only
see finite updates. `limit` skips in a row stop the run with an error.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("rlhf")


class NonFiniteError(RuntimeError):
    """A model or a loss produced NaN / inf where training cannot go on."""


def check_finite(name: str, values: torch.Tensor, mask: torch.Tensor, advice: str) -> None:
    """NonFiniteError naming `name` when `values` holds NaN / inf where `mask` is set."""
    bad = ~torch.isfinite(values) & (mask != 0)
    if bool(bad.any()):
        rows = bad.any(dim=-1).nonzero().flatten().tolist()
        raise NonFiniteError(f"{name} non-finite for {int(bad.sum())} tokens (rows "
                             f"{rows[:8]}{' ...' if len(rows) > 8 else ''}): {advice}")


def _local_grads(engine) -> list[torch.Tensor]:
    """The gradients this rank holds as .grad (none under ZeRO 2 / 3, which partition them)."""
    module = getattr(engine, "module", engine)
    return [p.grad for p in module.parameters() if p.grad is not None]


def _at_boundary(engine) -> bool:
    boundary = getattr(engine, "is_gradient_accumulation_boundary", None)
    return boundary() if callable(boundary) else True


class NonFiniteGuard:
    """Counts skipped updates; `limit` (0 = no limit) in a row of one model raise
    NonFiniteError (the actor's and the critic's runs are counted apart).

    Args:
        limit: skips in a row that stop the run.
        setting: the config key of `limit`, named in the error.
    """

    def __init__(self, limit: int = 10, setting: str = "max_skipped_steps"):
        self.limit, self.setting = limit, setting
        self.in_a_row: dict[str, int] = {}
        self.total = 0

    def backward_and_step(self, engine, loss: torch.Tensor, what: str) -> bool:
        """engine.backward(loss) + engine.step() when the loss (and the local gradients at the
        accumulation boundary) are finite; else skip, count, and return False."""
        if bool(torch.isfinite(loss)):
            engine.backward(loss)
            if not _at_boundary(engine) or self._grads_finite(engine):
                engine.step()
                self.in_a_row[what] = 0
                return True
            engine.zero_grad()  # the accumulated window holds a non-finite gradient: drop it
        return self._skip(what, float(loss.detach()))

    @staticmethod
    def _grads_finite(engine) -> bool:
        grads = _local_grads(engine)
        return not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())

    def _skip(self, what: str, loss: float) -> bool:
        self.in_a_row[what] = run = self.in_a_row.get(what, 0) + 1
        self.total += 1
        log.warning("skipped a %s update: non-finite loss or gradient (loss %s; %d in a row, %d "
                    "in all)", what, loss, run, self.total)
        if self.limit and run >= self.limit:
            raise NonFiniteError(
                f"{run} updates in a row had a non-finite {what} loss or gradient "
                f"(last loss {loss}): training has diverged; lower the learning rate or the "
                f"coefficients of the loss terms (rl.kl_ctl, rl.ptx_coef, rl.entropy_coef), or "
                f"raise {self.setting} to skip more")
        return False
