"""Hyperparameters of the RL step (rollout -> advantages -> updates), DeepSpeed-Chat defaults."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# names used by other configuration objects for the same knobs
_ALIASES = {"num_samples": "group_size", "loss_agg": "agg"}


@dataclass
class RLHParams:
    """What the algorithms read. One KL coefficient, `kl_ctl`, serves every algorithm: the
    algorithm decides whether it shapes the reward (ppo, rloo, reinforce: k1 per token) or
    enters the actor loss (grpo: `kl_estimator`, k3 by default).

    Attributes:
        kl_ctl: KL coefficient (DeepSpeed-Chat 0.1).
        clip_reward_value: the score is clipped to +-this before shaping (None: no clip).
        gamma, lam: discount and GAE lambda.
        whiten_advantages: whiten PPO's GAE advantages over the batch (DeepSpeed-Chat: no).
        group_size: samples per prompt for grpo / rloo (consecutive rows).
        scale_by_std: grpo divides by the group's std (False: Dr. GRPO).
        group_std_eps: added to the group std before dividing.
        cliprange, cliprange_value: PPO ratio clip and value clip.
        kl_estimator: estimator of the KL term in the loss ("k1", "k2", "k3").
        entropy_coef: entropy bonus in the actor loss.
        temperature: sampling temperature; log-probs are recomputed at it.
        agg: actor loss aggregation (see rlhf_kernels.ppo_actor_loss).
        ppo_epochs: passes over one experience batch.
        micro_batch_size: rows per update.
        ptx_coef: weight of the pretraining loss when ptx batches are mixed in.
    """
    kl_ctl: float = 0.1
    clip_reward_value: float | None = 5.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = False
    group_size: int = 4
    scale_by_std: bool = True
    group_std_eps: float = 1e-4
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    temperature: float = 1.0
    agg: str = "token-mean"
    ppo_epochs: int = 1
    micro_batch_size: int = 16
    ptx_coef: float = 27.8

    def __post_init__(self):
        for name in ("group_size", "ppo_epochs", "micro_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.kl_ctl >= 0:
            raise ValueError(f"kl_ctl must be >= 0, got {self.kl_ctl}")
        if self.clip_reward_value is not None and not self.clip_reward_value > 0:
            raise ValueError(f"clip_reward_value must be > 0 (or None), got "
                             f"{self.clip_reward_value}")

    @classmethod
    def from_config(cls, config, **overrides) -> RLHParams:
        """Take every field found on `config` (any object, e.g. the trainer's RL section;
        `num_samples` and `loss_agg` are understood as `group_size` and `agg`), then
        `overrides`."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for attr in dir(config):
            name = _ALIASES.get(attr, attr)
            if name in names and not attr.startswith("_"):
                values[name] = getattr(config, attr)
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown hyperparameters {sorted(unknown)}; valid: {sorted(names)}")
        values.update(overrides)
        return cls(**values)
