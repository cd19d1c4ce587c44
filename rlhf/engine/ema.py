"""Exponential moving average of a model's weights (DeepSpeed-Chat's optional actor EMA)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlhf.models.export import gathered
from rlhf_kernels.generation import unwrap


class EMA:
    """A float32 shadow of the trainable parameters: shadow <- beta * shadow + (1 - beta) * param.

    Works with plain modules and DeepSpeed engines; ZeRO-3 parameters are gathered for each
    update, and the shadow holds the full (unpartitioned) tensors on every rank.

    Args:
        model: the model (or engine) to follow; the shadow starts as a copy of its weights.
        beta: the decay, in [0, 1).
        device: where the shadow lives (default: each parameter's device); "cpu" saves
            accelerator memory at the cost of a copy per update.
    """

    def __init__(self, model: nn.Module, beta: float = 0.992, *, device: str | torch.device | None = None):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.device = device
        self.num_updates = 0
        module = unwrap(model)
        with gathered(module), torch.no_grad():
            self.shadow = {name: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                           for name, p in self._tracked(module)}
        if not self.shadow:
            raise ValueError("the model has no trainable parameter to average")

    @staticmethod
    def _tracked(module: nn.Module):
        return [(name, p) for name, p in module.named_parameters() if p.requires_grad]

    def _pairs(self, module: nn.Module):
        """(shadow, parameter) by name; the module may have more parameters (e.g. frozen ones)."""
        params = dict(module.named_parameters())
        missing = [name for name in self.shadow if name not in params]
        if missing:
            raise ValueError(f"model does not have the EMA's parameters {missing[:3]} "
                             f"({len(missing)} missing)")
        return [(shadow, params[name]) for name, shadow in self.shadow.items()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the current weights of `model` (call after each optimizer step)."""
        module = unwrap(model)
        with gathered(module):
            for shadow, p in self._pairs(module):
                shadow.lerp_(p.detach().to(device=shadow.device, dtype=torch.float32), 1.0 - self.beta)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Writes the averaged weights into `model` (e.g. a copy of the actor saved as the EMA
        model); under ZeRO-3 rank 0's values are scattered back to the partitions."""
        module = unwrap(model)
        with gathered(module, modifier_rank=0):
            for shadow, p in self._pairs(module):
                p.copy_(shadow.to(device=p.device, dtype=p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "num_updates": self.num_updates,
                "shadow": {name: t.detach().cpu() for name, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match this EMA's parameters")
        self.beta = float(state["beta"])
        self.num_updates = int(state["num_updates"])
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)
