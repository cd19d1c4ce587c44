"""Rewards shaping, advantage estimators, the algorithm registry and RLHParams, against
hand-computed values and float64 NumPy / plain-Python oracles written here."""
import types

import numpy as np
import pytest
import torch

from rlhf.config import load_config
from rlhf.algorithms import (ALGORITHMS, Experience, RLHParams, check_groups, gae_advantages,
                             get_algorithm, group_normalized_advantages, kl_shaped_rewards,
                             last_token_index, leave_one_out_advantages, reinforce_advantages)


def random_mask(gen, batch, length):
    """A [B, N] bool mask with holes, a row with no token, and a 1-token row."""
    mask = torch.rand(batch, length, generator=gen) > 0.3
    mask[0] = False
    if batch > 1:
        mask[1] = False
        mask[1, 0] = True
    return mask


# ---------------------------------------------------------------------------- reward shaping

def test_kl_shaped_rewards_hand_computed():
    mask = torch.tensor([[1, 1, 1, 0],     # last real token at 2
                         [1, 0, 0, 0],     # 1-token response
                         [0, 0, 0, 0],     # no response: gets nothing
                         [1, 0, 1, 0]])    # a hole: the last 1 is at 2
    old = torch.tensor([[-1.0, -2.0, -0.5, float("nan")],  # padding may hold anything
                        [-0.3, 7.0, 7.0, 7.0],
                        [-1.0, -1.0, -1.0, -1.0],
                        [-2.0, 5.0, -1.0, 5.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0],
                        [-0.1, 0.0, 0.0, 0.0],
                        [-3.0, -3.0, -3.0, -3.0],
                        [-1.0, 0.0, -2.0, 0.0]])
    scores = torch.tensor([2.0, 10.0, 3.0, -7.0])
    got = kl_shaped_rewards(scores, old, ref, mask, kl_ctl=0.1, clip_reward_value=5.0)
    want = torch.tensor([[-0.05, 0.1, 2.0, 0.0],
                         [0.02 + 5.0, 0.0, 0.0, 0.0],   # score 10 clipped to 5
                         [0.0, 0.0, 0.0, 0.0],
                         [0.1, 0.0, -0.1 - 5.0, 0.0]])  # score -7 clipped to -5
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_kl_shaped_rewards_without_clip_or_kl():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([9.0, -8.0])
    old = torch.zeros(2, 3)
    got = kl_shaped_rewards(scores, old, None, mask, kl_ctl=0.0, clip_reward_value=None)
    torch.testing.assert_close(got, torch.tensor([[0.0, 9.0, 0.0], [0.0, 0.0, -8.0]]))


def test_kl_shaped_rewards_bad_input():
    mask = torch.ones(2, 3)
    old = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        kl_shaped_rewards(torch.zeros(2), old, None, mask, kl_ctl=0.1)
    with pytest.raises(ValueError, match="ref_logprobs must have shape"):
        kl_shaped_rewards(torch.zeros(2), old, torch.zeros(2, 4), mask)
    with pytest.raises(ValueError, match="scores must have shape"):
        kl_shaped_rewards(torch.zeros(3), old, old, mask)


def test_last_token_index():
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    index, has = last_token_index(mask)
    assert index.tolist() == [4, 0, 0]
    assert has.tolist() == [True, False, True]


# ---------------------------------------------------------------------------- PPO: GAE

def gae_loop(rewards, values, mask, gamma, lam):
    """DeepSpeed-Chat's GAE, float64, one scalar at a time: masked rewards and values are 0."""
    batch, length = len(rewards), len(rewards[0])
    adv = [[0.0] * length for _ in range(batch)]
    ret = [[0.0] * length for _ in range(batch)]
    for b in range(batch):
        r = [float(rewards[b][t]) if mask[b][t] else 0.0 for t in range(length)]
        v = [float(values[b][t]) if mask[b][t] else 0.0 for t in range(length)]
        last = 0.0
        for t in reversed(range(length)):
            next_v = v[t + 1] if t + 1 < length else 0.0
            last = r[t] + gamma * next_v - v[t] + gamma * lam * last
            adv[b][t] = last if mask[b][t] else 0.0
            ret[b][t] = last + v[t] if mask[b][t] else 0.0
    return np.array(adv), np.array(ret)


def whiten_np(x, mask):
    """Batch whitening over the valid tokens; the variance is 0 below two tokens."""
    valid = x[mask]
    var = valid.var(ddof=1) if valid.size > 1 else 0.0
    return np.where(mask, (x - valid.mean()) / np.sqrt(var + 1e-8), 0.0)


@pytest.mark.parametrize("batch,length", [(5, 9), (2, 1), (3, 33)])
@pytest.mark.parametrize("whiten", [False, True])
def test_ppo_advantages_match_python_gae(batch, length, whiten):
    gen = torch.Generator().manual_seed(batch * 100 + length)
    rewards = torch.randn(batch, length, generator=gen)
    values = torch.randn(batch, length, generator=gen)
    mask = random_mask(gen, batch, length)
    mask[-1, 0] = True  # at least one valid token overall
    gamma, lam = 0.9 + 0.1 * torch.rand(1, generator=gen).item(), 0.95
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)
    want_adv, want_ret = gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    if whiten:
        want_adv = whiten_np(want_adv, mask.numpy())
    np.testing.assert_allclose(adv.numpy(), want_adv, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ret.numpy(), want_ret, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- group estimators

def test_grpo_advantages_match_numpy():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(6, generator=gen) * 3
    mask = random_mask(gen, 6, 5)
    adv, ret = group_normalized_advantages(scores, mask, 3, eps=1e-4)
    assert ret is None
    s = scores.double().numpy().reshape(2, 3)
    want = ((s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()
    np.testing.assert_allclose(adv.numpy(), np.where(mask.numpy(), want[:, None], 0.0),
                               atol=1e-6)
    adv, _ = group_normalized_advantages(scores, mask, 3, scale_by_std=False)  # Dr. GRPO
    want = (s - s.mean(1, keepdims=True)).ravel()
    np.testing.assert_allclose(adv.numpy(), np.where(mask.numpy(), want[:, None], 0.0),
                               atol=1e-6)


def test_rloo_advantages_match_leave_one_out_loop():
    gen = torch.Generator().manual_seed(2)
    rewards = torch.randn(8, generator=gen)
    mask = torch.ones(8, 3, dtype=torch.bool)
    mask[2, 1:] = False
    adv, ret = leave_one_out_advantages(rewards, mask, 4)
    assert ret is None
    r = rewards.double().tolist()
    want = []
    for i in range(8):
        group = range(i // 4 * 4, i // 4 * 4 + 4)
        others = [r[j] for j in group if j != i]
        want.append(r[i] - sum(others) / len(others))
    want = np.array(want)[:, None] * mask.numpy()
    np.testing.assert_allclose(adv.numpy(), want, atol=1e-6)


@pytest.mark.parametrize("estimator", [group_normalized_advantages, leave_one_out_advantages])
def test_group_of_identical_scores_gives_zero(estimator):
    scores = torch.tensor([0.1, 0.1, 0.1, 0.1, 1e6, 1e6, 1e6, 1e6])
    adv, _ = estimator(scores, torch.ones(8, 2), 4)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv, torch.zeros(8, 2))


@pytest.mark.parametrize("estimator", [group_normalized_advantages, leave_one_out_advantages])
def test_group_size_errors(estimator):
    with pytest.raises(ValueError, match="batch size 5 is not divisible by group_size 2"):
        estimator(torch.zeros(5), torch.ones(5, 3), 2)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        estimator(torch.zeros(4), torch.ones(4, 3), 1)
    with pytest.raises(ValueError, match=r"scores must have shape \(4,\)"):
        estimator(torch.zeros(4, 1), torch.ones(4, 3), 2)
    assert check_groups(12, 3) == 4


def test_reinforce_advantages_are_whitened_returns_to_go():
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(4, 6, generator=gen)
    mask = random_mask(gen, 4, 6)
    mask[3] = True
    gamma = 0.9
    adv, ret = reinforce_advantages(rewards, mask, gamma=gamma)
    r = np.where(mask.numpy(), rewards.double().numpy(), 0.0)
    want_ret = np.zeros_like(r)
    for b in range(4):
        running = 0.0
        for t in reversed(range(6)):
            running = r[b, t] + gamma * running
            want_ret[b, t] = running
    want_ret = np.where(mask.numpy(), want_ret, 0.0)
    np.testing.assert_allclose(ret.numpy(), want_ret, atol=1e-5)
    np.testing.assert_allclose(adv.numpy(), whiten_np(want_ret, mask.numpy()), atol=1e-5)
    assert abs(float(adv[mask].mean())) < 1e-5  # the baseline removed the batch mean


# ---------------------------------------------------------------------------- registry

def make_exp(scores, old, ref, mask, values=None):
    batch, n = mask.shape
    return Experience(sequences=torch.ones(batch, n + 2, dtype=torch.long),
                      attention_mask=torch.ones(batch, n + 2, dtype=torch.long),
                      action_mask=mask, prompt_len=2, old_logprobs=old, ref_logprobs=ref,
                      values=values, scores=scores)


def test_registry_flags_and_lookup():
    assert set(ALGORITHMS) == {"ppo", "grpo", "rloo", "reinforce"}
    assert [n for n, a in ALGORITHMS.items() if a.needs_critic] == ["ppo"]
    assert [n for n, a in ALGORITHMS.items() if not a.kl_in_reward] == ["grpo"]
    hp = RLHParams(kl_ctl=0.05)
    assert get_algorithm("grpo").loss_kl_coef(hp) == 0.05
    assert get_algorithm("ppo").loss_kl_coef(hp) == 0.0
    with pytest.raises(ValueError, match="unknown algorithm 'dpo'.*grpo"):
        get_algorithm("dpo")


def test_algorithms_on_an_experience():
    gen = torch.Generator().manual_seed(4)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1, 2] = False
    old, ref = -torch.rand(4, 3, generator=gen), -torch.rand(4, 3, generator=gen)
    scores = torch.tensor([1.0, 6.0, -2.0, 0.5])
    hp = RLHParams(kl_ctl=0.1, num_samples=2, clip_reward_value=5.0)
    exp = make_exp(scores, old, ref, mask, values=torch.randn(4, 3, generator=gen))
    # rloo: sequence reward = clipped score - kl_ctl * sum of k1 over the response
    seq = scores.clamp(-5, 5) - 0.1 * torch.where(mask, old - ref, 0.0).sum(1)
    adv, _ = get_algorithm("rloo").advantages(exp, hp)
    torch.testing.assert_close(adv[:, 0], torch.stack([seq[0] - seq[1], seq[1] - seq[0],
                                                       seq[2] - seq[3], seq[3] - seq[2]]))
    # grpo: raw scores (no clip, no KL), the reward is the score at the last token
    grpo = get_algorithm("grpo")
    assert grpo.rewards(exp, hp)[1].tolist() == [0.0, 6.0, 0.0]
    adv, _ = grpo.advantages(exp, hp)
    assert adv[0, 0] < 0 < adv[1, 0] and adv[1, 2] == 0
    # ppo uses exp.rewards when present
    exp.rewards = torch.zeros(4, 3)
    exp.values = torch.zeros(4, 3)
    adv, ret = get_algorithm("ppo").advantages(exp, hp)
    assert torch.equal(adv, torch.zeros(4, 3)) and torch.equal(ret, torch.zeros(4, 3))
    exp.values = None
    with pytest.raises(ValueError, match="ppo advantages need the critic's values"):
        get_algorithm("ppo").advantages(exp, hp)


# ---------------------------------------------------------------------------- RLHParams

def test_hparams_from_config_and_validation():
    rl = load_config(overrides={"rl.algorithm": "grpo", "rl.kl_ctl": 0.02, "rl.num_samples": 8,
                                "rl.loss_agg": "seq-mean-token-sum-norm", "rl.gamma": 0.99,
                                "rl.dual_clip": 3.0}).rl
    hp = RLHParams.from_config(rl, train_batch_size=4)
    assert (hp.kl_ctl, hp.num_samples, hp.loss_agg, hp.gamma, hp.train_batch_size,
            hp.dual_clip) == (0.02, 8, "seq-mean-token-sum-norm", 0.99, 4, 3.0)
    assert hp.lam == 0.95 and hp.clip_reward_value == 5.0  # DeepSpeed-Chat defaults kept
    with pytest.raises(ValueError, match=r"unknown hyperparameters \['kl_coeff'\]"):
        RLHParams.from_config(rl, kl_coeff=0.1)
    # an object without one of the fields is an error, not a silently kept default
    partial = types.SimpleNamespace(**{k: v for k, v in vars(rl).items() if k != "dual_clip"})
    with pytest.raises(ValueError, match="has no field 'dual_clip'"):
        RLHParams.from_config(partial)
    with pytest.raises(ValueError, match="num_samples must be None or an integer >= 1"):
        RLHParams(num_samples=0)
    with pytest.raises(ValueError, match="train_batch_size must be an integer >= 1"):
        RLHParams(train_batch_size=2.5)
    with pytest.raises(ValueError, match="kl_ctl must be >= 0"):
        RLHParams(kl_ctl=-0.1)
    with pytest.raises(ValueError, match="dual_clip must be None or > 1"):
        RLHParams(dual_clip=0.5)
