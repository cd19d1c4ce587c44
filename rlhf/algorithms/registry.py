"""The algorithms as small objects, so that one trainer loop runs them all:

    for step: generate -> make_experience(..., algorithm) -> train_step(..., algorithm)

Each says whether it needs a critic, how many samples it draws per prompt, where the KL to the
reference goes (into the reward, or into the actor loss with hp.kl_ctl as coefficient) and with
which estimator by default, and how it turns scores into advantages. Code outside this module
asks these objects; it never tests an algorithm's name.
"""
from __future__ import annotations

from . import advantages as estimators
from .rewards_shaping import kl_shaped_rewards, score_at_last_token


class Algorithm:
    """Base: per-token rewards from scores, then an advantage estimator.

    Attributes:
        needs_critic: trains a value model (GAE).
        kl_in_reward: the KL to the reference shapes the per-token reward; else it is a term of
            the actor loss.
        default_kl_estimator: the estimator hp.kl_estimator = "auto" stands for. In the reward
            k1 is unbiased for the KL's value (DeepSpeed-Chat); in the loss only the gradient
            matters, and k1's expected gradient under on-policy samples is zero, so k3.
        grouped: samples of one prompt form a group (its baseline); whole groups are kept.
        default_num_samples: samples per prompt when hp.num_samples is None.
    """
    name: str = ""
    needs_critic: bool = False
    kl_in_reward: bool = True
    grouped: bool = False
    default_num_samples: int = 1

    @property
    def default_kl_estimator(self) -> str:
        return "k1" if self.kl_in_reward else "k3"

    def kl_estimator(self, hp) -> str:
        return self.default_kl_estimator if hp.kl_estimator == "auto" else hp.kl_estimator

    def samples_per_prompt(self, hp) -> int:
        return self.default_num_samples if hp.num_samples is None else hp.num_samples

    def check_num_samples(self, num_samples, key: str = "num_samples") -> None:
        """ValueError naming `key` when a grouped algorithm would get groups of one."""
        n = self.default_num_samples if num_samples is None else num_samples
        if self.grouped and n < 2:
            where = f"config key {key!r}" if "." in key else key
            raise ValueError(f"{where} must be >= 2 for {self.name} (its baseline is the "
                             f"group), got {num_samples!r}")

    def loss_kl_coef(self, hp) -> float:
        """Coefficient of the KL term of the actor loss (0 when the KL shapes the reward)."""
        return 0.0 if self.kl_in_reward else hp.kl_ctl

    def rewards(self, exp, hp):
        """[B, N] per-token rewards: KL-shaped (DeepSpeed-Chat) when kl_in_reward, else the
        raw score at the last response token."""
        if self.kl_in_reward:
            return kl_shaped_rewards(exp.scores, exp.old_logprobs, exp.ref_logprobs,
                                     exp.action_mask, kl_ctl=hp.kl_ctl,
                                     clip_reward_value=hp.clip_reward_value,
                                     kl_estimator=self.kl_estimator(hp))
        return score_at_last_token(exp.scores, exp.action_mask)

    def advantages(self, exp, hp):
        """(advantages [B, N], returns [B, N] or None) of an experience (its rewards are
        computed when exp.rewards is None)."""
        rewards = exp.rewards if exp.rewards is not None else self.rewards(exp, hp)
        return self._estimate(exp, rewards, hp)

    def _estimate(self, exp, rewards, hp):
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}(name={self.name!r}, needs_critic={self.needs_critic}, "
                f"kl_in_reward={self.kl_in_reward}, grouped={self.grouped})")


class PPO(Algorithm):
    """PPO with a critic and GAE on KL-shaped rewards (DeepSpeed-Chat step 3)."""
    name, needs_critic, kl_in_reward = "ppo", True, True

    def _estimate(self, exp, rewards, hp):
        if exp.values is None:
            raise ValueError("ppo advantages need the critic's values (experience.values)")
        return estimators.gae_advantages(rewards, exp.values, exp.action_mask, gamma=hp.gamma,
                                         lam=hp.lam, whiten=hp.whiten_advantages)


class GRPO(Algorithm):
    """GRPO: group-normalised scores, KL to the reference as a loss term (hp.kl_estimator)."""
    name, needs_critic, kl_in_reward = "grpo", False, False
    grouped, default_num_samples = True, 4

    def _estimate(self, exp, rewards, hp):
        return estimators.group_normalized_advantages(
            exp.scores, exp.action_mask, self.samples_per_prompt(hp),
            scale_by_std=hp.scale_by_std, eps=hp.group_std_eps)


class RLOO(Algorithm):
    """RLOO: leave-one-out baseline on sequence rewards. As in the RLOO paper the KL is in the
    reward: sequence reward = clipped score - kl_ctl * sum_t (logp_old - logp_ref)."""
    name, needs_critic, kl_in_reward = "rloo", False, True
    grouped, default_num_samples = True, 4

    def _estimate(self, exp, rewards, hp):
        return estimators.leave_one_out_advantages(rewards.sum(dim=1), exp.action_mask,
                                                   self.samples_per_prompt(hp))


class Reinforce(Algorithm):
    """REINFORCE with a baseline: discounted returns-to-go of the KL-shaped rewards, whitened
    over the batch (REINFORCE++); no critic."""
    name, needs_critic, kl_in_reward = "reinforce", False, True

    def _estimate(self, exp, rewards, hp):
        return estimators.reinforce_advantages(rewards, exp.action_mask, gamma=hp.gamma)


ALGORITHMS = {algo.name: algo for algo in (PPO(), GRPO(), RLOO(), Reinforce())}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}") \
            from None
