"""The GAE that trainers run today: a Python loop over T, about five kernel launches per step.

Written for this benchmark after the published semantics of each family.
"""
import torch


def loop_gae_zero(rewards, values, mask, gamma=1.0, lam=0.95):
    """DeepSpeed-Chat / TRL / OpenRLHF: masked rewards and values, a reverse loop, a stack."""
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[1]
    last = 0.0
    reversed_adv = []
    for t in range(length - 1, -1, -1):
        next_values = values[:, t + 1] if t + 1 < length else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values


def loop_gae_skip(rewards, values, mask, gamma=1.0, lam=0.95):
    """veRL: masked tokens carry the next value and the running advantage through unchanged."""
    next_values = torch.zeros_like(values[:, 0])
    last = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        candidate = delta + gamma * lam * last
        next_values = values[:, t] * m + (1 - m) * next_values
        last = candidate * m + (1 - m) * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values
