"""Every RL setting changes what it says: dual clip, the KL estimator per algorithm, no reference
term at kl_ctl 0, the short-rollout rule, and the settings that used to be read nowhere."""
import types

import pytest
import torch

from rlhf.algorithms import (Experience, RLHParams, actor_loss, get_algorithm, kl_shaped_rewards,
                             rollouts_to_keep)
from rlhf.config import load_config
from rlhf.trainers import rl as rl_trainer
from rlhf.trainers.scoring import Scorer
from rlhf.trainers.tracking import Tracker
from trainer_support import read_jsonl, tiny_config


class Bandit(torch.nn.Module):
    """A one-step policy: the same learnable logits at every position (an LM-shaped bandit)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32).clone())

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        return types.SimpleNamespace(logits=self.logits.expand(b, t, -1))


def bandit_experience(policy, tokens, *, advantages=None, ref_logprobs=None):
    """[B] sampled tokens as one-token responses to a one-token prompt."""
    b = tokens.shape[0]
    sequences = torch.stack([torch.zeros_like(tokens), tokens], 1)
    with torch.no_grad():
        old = torch.log_softmax(policy.logits, -1)[tokens][:, None]
    return Experience(sequences, torch.ones_like(sequences), torch.ones(b, 1, dtype=torch.bool), 1,
                      old_logprobs=old, ref_logprobs=ref_logprobs,
                      advantages=torch.zeros(b, 1) if advantages is None else advantages)


# ---------------------------------------------------------------------------- 1. dual clip

def test_dual_clip_bounds_the_loss_of_negative_advantages():
    policy = Bandit([0.0, 1.0, -1.0])
    tokens = torch.tensor([0, 1, 2, 1])
    exp = bandit_experience(policy, tokens, advantages=torch.full((4, 1), -1.0))
    exp.old_logprobs = exp.old_logprobs - 2.0  # ratio e^2 = 7.4: far above the clip range
    grpo = get_algorithm("grpo")
    plain, _ = actor_loss(policy, exp, RLHParams(kl_ctl=0.0), grpo)
    dual, _ = actor_loss(policy, exp, RLHParams(kl_ctl=0.0, dual_clip=3.0), grpo)
    # -A * ratio = 7.39 without the dual clip; bounded by -A * dual_clip = 3 with it
    torch.testing.assert_close(plain, torch.tensor(float(torch.e ** 2)))
    torch.testing.assert_close(dual, torch.tensor(3.0))


def test_dual_clip_flag_reaches_the_hyperparameters():
    cfg = load_config(overrides={"rl.dual_clip": "2.5"})
    assert RLHParams.from_config(cfg.rl).dual_clip == 2.5


# ---------------------------------------------------------------------------- 2. KL estimator

def kl_gradients(hp, algorithm, samples=40000, seed=0):
    """The mean over on-policy samples of the gradient of the loss's KL term with respect to
    the policy logits, and the exact gradients of KL(pi || ref) and KL(ref || pi)."""
    policy, ref_logits = Bandit([0.5, -0.3, 0.2, -1.0]), torch.tensor([0.0, 0.4, -0.6, 0.1])
    probs = torch.softmax(policy.logits.detach(), -1)
    tokens = torch.multinomial(probs, samples, replacement=True,
                               generator=torch.Generator().manual_seed(seed))
    ref = torch.log_softmax(ref_logits, -1)[tokens][:, None]
    exp = bandit_experience(policy, tokens, ref_logprobs=ref)
    loss, _ = actor_loss(policy, exp, hp, algorithm)
    sampled, = torch.autograd.grad(loss, policy.logits)
    logp, logq = torch.log_softmax(policy.logits, -1), torch.log_softmax(ref_logits, -1)
    forward, = torch.autograd.grad((logp.exp() * (logp - logq)).sum(), policy.logits,
                                   retain_graph=True)
    reverse, = torch.autograd.grad((logq.exp() * (logq - logp)).sum(), policy.logits)
    return sampled, forward, reverse


def test_grpo_in_loss_kl_has_a_kl_gradient_by_default():
    grpo = get_algorithm("grpo")
    assert RLHParams().kl_estimator == "auto" and grpo.kl_estimator(RLHParams()) == "k3"
    # E_pi[grad k3] = grad KL(ref || pi): a divergence to the reference with a real gradient
    # (GRPO's choice); E_pi[grad k2] = grad KL(pi || ref); E_pi[grad k1] = 0. With 40000
    # samples the Monte-Carlo error of each component is ~3e-3 against gradients of ~0.1.
    k3, forward, reverse = kl_gradients(RLHParams(kl_ctl=1.0), grpo)
    assert float(reverse.norm()) > 0.1 and float(forward.norm()) > 0.1
    torch.testing.assert_close(k3, reverse, atol=0.015, rtol=0)
    k2, _, _ = kl_gradients(RLHParams(kl_ctl=1.0, kl_estimator="k2"), grpo)
    torch.testing.assert_close(k2, forward, atol=0.015, rtol=0)
    k1, _, _ = kl_gradients(RLHParams(kl_ctl=1.0, kl_estimator="k1"), grpo)
    assert float(k1.norm()) < 0.15 * float(forward.norm())


def test_reward_shaping_keeps_k1_by_default_and_reads_the_estimator():
    ppo = get_algorithm("ppo")
    assert ppo.kl_estimator(RLHParams()) == "k1"
    old, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    exp = Experience(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long),
                     torch.ones(1, 2, dtype=torch.bool), 1, old_logprobs=old, ref_logprobs=ref,
                     scores=torch.tensor([1.0]))
    d = old - ref
    k1 = ppo.rewards(exp, RLHParams(kl_ctl=0.1))
    torch.testing.assert_close(k1, -0.1 * d + torch.tensor([[0.0, 1.0]]))
    k2 = ppo.rewards(exp, RLHParams(kl_ctl=0.1, kl_estimator="k2"))
    torch.testing.assert_close(k2, -0.1 * 0.5 * d * d + torch.tensor([[0.0, 1.0]]))


# ---------------------------------------------------------------------------- 3. kl_ctl = 0

def test_zero_kl_coefficient_has_no_reference_term():
    # the sampled token has log-prob -200 under the policy and 0 under the "reference": the
    # k3 estimate exp(ref - logp) overflows float32, and 0 * inf would be NaN
    policy = Bandit([0.0, -200.0])
    tokens = torch.tensor([1, 1, 0])
    exp = bandit_experience(policy, tokens, advantages=torch.ones(3, 1),
                            ref_logprobs=torch.zeros(3, 1))
    loss, stats = actor_loss(policy, exp, RLHParams(kl_ctl=0.0, kl_estimator="k3"),
                             get_algorithm("grpo"))
    assert torch.isfinite(loss) and "kl" not in stats
    loss.backward()
    assert torch.isfinite(policy.logits.grad).all()
    rewards = kl_shaped_rewards(torch.ones(3), exp.old_logprobs, exp.ref_logprobs,
                                exp.action_mask, kl_ctl=0.0, kl_estimator="k3")
    assert torch.equal(rewards, torch.ones(3, 1))


# ---------------------------------------------------------------------------- 4. unread settings

def test_adam_betas_reach_the_optimizer(tmp_path):
    from rlhf.engine import init_train_engine
    from rlhf.trainers.setup import ds_config
    cfg = tiny_config(tmp_path, {"deepspeed.adam_betas": "0.8,0.99"})
    config = ds_config(cfg, lr=1e-3, weight_decay=0.0, micro_batch=1, grad_accum=1, warmup=0,
                       total_steps=1, scheduler="constant", warmup_key="rl.warmup")
    assert config["optimizer"]["params"]["betas"] == [0.8, 0.99]
    engine = init_train_engine(torch.nn.Linear(3, 2), config)
    assert all(tuple(g["betas"]) == (0.8, 0.99) for g in engine.optimizer.param_groups)


@pytest.mark.parametrize("offload", [False, True])
def test_offload_reference_model_reaches_the_reference_config(tmp_path, monkeypatch, offload):
    seen = {}
    monkeypatch.setattr(rl_trainer, "init_train_engine", lambda model, config: model)
    monkeypatch.setattr(rl_trainer, "init_eval_engine",
                        lambda model, config: seen.setdefault(model.name, config) and model)
    cfg = tiny_config(tmp_path, {"deepspeed.zero_stage": 3,
                                 "deepspeed.offload_reference_model": offload})
    reference, reward = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    reference.name, reward.name = "reference", "reward"
    rl_trainer._engines(cfg, torch.nn.Linear(2, 2), None, reference,
                        Scorer(None, reward_model=reward), iterations=1, rollouts=4)
    device = "cpu" if offload else "none"
    assert seen["reference"]["zero_optimization"]["offload_param"]["device"] == device
    assert seen["reward"]["zero_optimization"]["offload_param"]["device"] == "none"


def test_offload_reference_model_needs_stage_3():
    with pytest.raises(ValueError, match="'deepspeed.offload_reference_model' needs "
                                         "deepspeed.zero_stage 3"):
        load_config(overrides={"deepspeed.offload_reference_model": True})


def test_log_every_averages_the_steps_between_writes(tmp_path):
    tracker = Tracker(tmp_path, "rl", tensorboard=False, progress=False, log_every=2)
    for step in range(1, 6):
        tracker.log(step, {"loss": float(step)} | ({"eval": 10.0} if step == 3 else {}))
    tracker.close()
    rows = read_jsonl(tmp_path / "metrics-rl.jsonl")
    assert rows == [{"step": 2, "loss": 1.5}, {"step": 4, "loss": 3.5, "eval": 10.0},
                    {"step": 5, "loss": 5.0}]
    assert tracker.history == rows


# ---------------------------------------------------------------------------- 6. short rollouts

def test_rollouts_to_keep_rows_and_whole_groups():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    assert rollouts_to_keep(mask, 2).tolist() == [0, 2, 3]  # DeepSpeed-Chat: drop <= 1 token
    assert rollouts_to_keep(mask, 0).tolist() == [0, 1, 2, 3]
    assert rollouts_to_keep(mask, 2, group_size=2).tolist() == [2, 3]
    assert rollouts_to_keep(mask, 4).tolist() == []


def fake_batch(lengths, prompts=None):
    n = max(lengths)
    mask = (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).long()
    gen = types.SimpleNamespace(sequences=torch.arange(len(lengths))[:, None].repeat(1, 2 + n),
                                logprobs=-mask.float(), response_mask=mask)
    gen = rl_trainer.dataclasses.make_dataclass(
        "Gen", ["sequences", "logprobs", "response_mask"])(**vars(gen))
    return rl_trainer.Rollouts(prompts or [f"p{i}" for i in range(len(lengths))],
                               torch.ones(len(lengths), 2, dtype=torch.long), gen)


def test_drop_short_drops_counts_and_reuses(tmp_path):
    cfg = tiny_config(tmp_path)
    run = types.SimpleNamespace(cfg=cfg, algorithm=get_algorithm("ppo"), samples_per_prompt=1)
    kept, dropped = rl_trainer.drop_short(run, fake_batch([3, 1, 2]), None)
    assert dropped == 1 and kept.prompts == ["p0", "p2"] and kept.fresh
    assert kept.generation.response_mask.sum(1).tolist() == [3, 2]
    # all short: the last kept batch again, marked for recomputed log-probs
    again, dropped = rl_trainer.drop_short(run, fake_batch([1, 1, 1]), kept)
    assert dropped == 3 and again.prompts == kept.prompts and not again.fresh
    assert rl_trainer.drop_short(run, fake_batch([1, 1]), None) == (None, 2)
    cfg.rl.min_response_tokens = 0
    assert rl_trainer.drop_short(run, fake_batch([1, 1]), None)[1] == 0


def test_short_rollouts_are_counted_in_a_run(tmp_path):
    # every answer of the tiny model is shorter than 100 tokens: all dropped, no update
    cfg = tiny_config(tmp_path, {"rl.algorithm": "reinforce", "rl.reward":
                                 "rlhf.data.synthetic:rule_score", "rl.kl_ctl": 0.0,
                                 "rl.min_response_tokens": 100, "rl.eval_every": 0})
    history = rl_trainer.run_rl(cfg)["history"]
    assert [row["dropped_rollouts"] for row in history] == [4.0, 4.0]
    assert all(row["skipped_iterations"] == 1.0 for row in history)


@pytest.mark.parametrize("recompute, fresh, want_behaviour", [
    (False, True, True), (True, True, False), (False, False, False)])
def test_recompute_logprobs_setting_and_reused_batches(tmp_path, monkeypatch, recompute, fresh,
                                                       want_behaviour):
    seen = {}
    monkeypatch.setattr(rl_trainer, "make_experience",
                        lambda *args, **kwargs: seen.update(kwargs))
    cfg = tiny_config(tmp_path, {"rl.recompute_logprobs": recompute})
    run = types.SimpleNamespace(cfg=cfg, actor=None, reference=None, scorer=None,
                                algorithm=get_algorithm("ppo"), hp=RLHParams(), critic=None)
    batch = fake_batch([2, 2])
    rl_trainer.experience(run, rl_trainer.dataclasses.replace(batch, fresh=fresh))
    assert seen["use_behaviour_logprobs"] is want_behaviour
