"""The RL math of the trainer: rollout -> experience -> advantages -> losses -> updates.

    algo = get_algorithm("ppo")          # or "grpo", "rloo", "reinforce"
    hp = RLHParams.from_config(cfg.rl)      # the rl section, field by field
    exp = make_experience(generation, prompt_mask, actor=..., reference=..., critic=...,
                          reward_fn=..., algorithm=algo, hp=hp)
    stats = train_step(actor_engine, critic_engine, exp, algo, hp)

GAE and the PPO losses are rlhf_kernels ops; this package only wires them.
"""
from ..models.value import last_token_index
from .advantages import (check_groups, gae_advantages, group_normalized_advantages,
                         leave_one_out_advantages, reinforce_advantages)
from .experience import Experience, make_experience, response_logprobs, rollouts_to_keep
from .hparams import RLHParams
from .losses import actor_loss, critic_loss, ptx_loss
from .model_forward import position_ids_from_mask, response_values
from .registry import ALGORITHMS, GRPO, PPO, RLOO, Algorithm, Reinforce, get_algorithm
from .rewards_shaping import kl_shaped_rewards, score_at_last_token
from .updates import TorchEngine, train_step

__all__ = [
    "ALGORITHMS", "Algorithm", "PPO", "GRPO", "RLOO", "Reinforce", "get_algorithm",
    "RLHParams", "Experience", "make_experience", "response_logprobs", "rollouts_to_keep",
    "response_values",
    "position_ids_from_mask", "kl_shaped_rewards", "score_at_last_token", "last_token_index",
    "check_groups", "gae_advantages", "group_normalized_advantages",
    "leave_one_out_advantages", "reinforce_advantages", "actor_loss", "critic_loss",
    "ptx_loss", "TorchEngine", "train_step",
]
