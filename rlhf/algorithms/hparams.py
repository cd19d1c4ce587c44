"""Hyperparameters of the RL step (rollout -> advantages -> updates).

One name per concept from the CLI flag to the loss: every field here is the field of the same
name of the config's `rl` section (`--rl.<name>`), with the same default, so the trainer builds
it with `RLHParams.from_config(cfg.rl)` and a library user with `RLHParams(kl_ctl=0.05, ...)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..config import RLConfig, check_rl_hparams

_RL_FIELDS = {f.name: f for f in dataclasses.fields(RLConfig)}


def _same_as_config(name: str):
    """The default (and help) of `rl.<name>`: the two can never disagree."""
    config_field = _RL_FIELDS[name]
    return dataclasses.field(default=config_field.default, metadata=config_field.metadata)


@dataclass
class RLHParams:
    """What the algorithms read; see `--help` (or rlhf.config.RLConfig) for each field.

    Where the KL to the reference goes is the algorithm's choice (ppo, rloo, reinforce: the
    per-token reward; grpo: the actor loss), with `kl_ctl` as its coefficient either way and
    `kl_estimator` ("auto": the algorithm's default) as its estimator. `num_samples` None means
    the algorithm's default (Algorithm.samples_per_prompt).
    """
    kl_ctl: float = _same_as_config("kl_ctl")
    kl_estimator: str = _same_as_config("kl_estimator")
    clip_reward_value: Optional[float] = _same_as_config("clip_reward_value")
    gamma: float = _same_as_config("gamma")
    lam: float = _same_as_config("lam")
    whiten_advantages: bool = _same_as_config("whiten_advantages")
    num_samples: Optional[int] = _same_as_config("num_samples")
    scale_by_std: bool = _same_as_config("scale_by_std")
    group_std_eps: float = _same_as_config("group_std_eps")
    cliprange: float = _same_as_config("cliprange")
    cliprange_value: float = _same_as_config("cliprange_value")
    dual_clip: Optional[float] = _same_as_config("dual_clip")
    entropy_coef: float = _same_as_config("entropy_coef")
    temperature: float = _same_as_config("temperature")
    loss_agg: str = _same_as_config("loss_agg")
    ppo_epochs: int = _same_as_config("ppo_epochs")
    train_batch_size: int = _same_as_config("train_batch_size")
    ptx_coef: float = _same_as_config("ptx_coef")

    def __post_init__(self):
        check_rl_hparams(self, prefix="")

    @classmethod
    def from_config(cls, rl, **overrides) -> RLHParams:
        """Each field from the attribute of the same name of `rl` (the config's rl section, or
        any object with those attributes), then `overrides`.

        Raises:
            ValueError: `rl` lacks a field, or an override names no field.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"unknown hyperparameters {unknown}; valid: {names}")
        missing = [n for n in names if n not in overrides and not hasattr(rl, n)]
        if missing:
            raise ValueError(f"{type(rl).__name__} has no field {missing[0]!r}: RLHParams takes "
                             f"{names} from the rl section")
        return cls(**{n: overrides[n] if n in overrides else getattr(rl, n) for n in names})
