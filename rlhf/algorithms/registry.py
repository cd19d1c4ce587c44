"""The algorithms as small objects, so that one trainer loop runs them all:

    for step: generate -> make_experience(..., algorithm) -> train_step(..., algorithm)

Each says whether it needs a critic, where the KL to the reference goes (into the reward, or
into the actor loss with hp.kl_ctl as coefficient), and how it turns scores into advantages.
"""
from __future__ import annotations

from . import advantages as estimators
from .rewards_shaping import kl_shaped_rewards, score_at_last_token


class Algorithm:
    """Base: per-token rewards from scores, then an advantage estimator."""
    name: str = ""
    needs_critic: bool = False
    kl_in_reward: bool = True

    def loss_kl_coef(self, hp) -> float:
        """Coefficient of the KL term of the actor loss (0 when the KL shapes the reward)."""
        return 0.0 if self.kl_in_reward else hp.kl_ctl

    def rewards(self, exp, hp):
        """[B, N] per-token rewards: KL-shaped (DeepSpeed-Chat) when kl_in_reward, else the
        raw score at the last response token."""
        if self.kl_in_reward:
            return kl_shaped_rewards(exp.scores, exp.old_logprobs, exp.ref_logprobs,
                                     exp.action_mask, kl_ctl=hp.kl_ctl,
                                     clip_reward_value=hp.clip_reward_value)
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
                f"kl_in_reward={self.kl_in_reward})")


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

    def _estimate(self, exp, rewards, hp):
        return estimators.group_normalized_advantages(
            exp.scores, exp.action_mask, hp.group_size, scale_by_std=hp.scale_by_std,
            eps=hp.group_std_eps)


class RLOO(Algorithm):
    """RLOO: leave-one-out baseline on sequence rewards. As in the RLOO paper the KL is in the
    reward: sequence reward = clipped score - kl_ctl * sum_t (logp_old - logp_ref)."""
    name, needs_critic, kl_in_reward = "rloo", False, True

    def _estimate(self, exp, rewards, hp):
        return estimators.leave_one_out_advantages(rewards.sum(dim=1), exp.action_mask,
                                                   hp.group_size)


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
