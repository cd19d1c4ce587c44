"""Faults in training never pass silently: non-finite losses and gradients are skipped and
counted (and stop the run after max_skipped_steps in a row), a diverged model is named with the
settings to look at, and a reward function that never returns hits rl.reward_timeout."""
import threading
import time
import types

import pytest
import torch

from rlhf.algorithms import RLHParams, TorchEngine, get_algorithm, make_experience
from rlhf.algorithms.nonfinite import NonFiniteError, NonFiniteGuard
from rlhf.rewards import score_with_fn
from rlhf.trainers import rl as rl_trainer
from rlhf.trainers.reward import run_rm
from test_algorithms_models import TinyCritic, rollout, score_fn, tiny_llama
from trainer_support import read_jsonl, tiny_config


def linear_engine(grad_accum=1):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return TorchEngine(layer, optimizer, gradient_accumulation_steps=grad_accum,
                       lr_scheduler=schedule)


def snapshot(engine):
    return [p.detach().clone() for p in engine.module.parameters()]


def test_non_finite_loss_is_skipped_not_applied():
    engine, guard = linear_engine(), NonFiniteGuard(limit=3)
    before, lr = snapshot(engine), engine.optimizer.param_groups[0]["lr"]
    x = torch.ones(2, 3)
    assert not guard.backward_and_step(engine, engine(x).sum() * float("inf"), "actor")
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(engine)))
    assert not engine.optimizer.state  # AdamW never stepped: no moments, no weight decay
    assert engine.optimizer.param_groups[0]["lr"] == lr  # the schedule did not advance
    assert guard.backward_and_step(engine, engine(x).sum(), "actor")
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(engine)))
    assert guard.total == 1 and guard.in_a_row["actor"] == 0


def test_non_finite_gradient_with_a_finite_loss_is_skipped():
    engine, guard = linear_engine(), NonFiniteGuard(limit=3)
    before = snapshot(engine)
    w = engine.module.weight
    loss = torch.sqrt(torch.zeros_like(w) * w).sum()  # 0, whose gradient is NaN / inf
    assert bool(torch.isfinite(loss))
    assert not guard.backward_and_step(engine, loss, "actor")
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(engine)))
    assert w.grad is None  # the window was dropped, not carried into the next step


def test_skipped_micro_batch_does_not_count_toward_accumulation():
    engine, guard = linear_engine(grad_accum=2), NonFiniteGuard(limit=3)
    x = torch.ones(2, 3)
    guard.backward_and_step(engine, engine(x).sum(), "actor")
    guard.backward_and_step(engine, engine(x).sum() * float("nan"), "actor")
    assert not engine.optimizer.state  # one finite micro-batch of two: no step yet
    guard.backward_and_step(engine, engine(x).sum(), "actor")
    assert engine.optimizer.state


def test_limit_in_a_row_stops_with_the_setting_named():
    engine, guard = linear_engine(), NonFiniteGuard(limit=2, setting="max_skipped_steps")
    bad = engine(torch.ones(1, 3)).sum() * float("inf")
    guard.backward_and_step(engine, bad, "critic")
    # another model's success does not reset the critic's run
    guard.backward_and_step(engine, engine(torch.ones(1, 3)).sum(), "actor")
    with pytest.raises(NonFiniteError, match="2 updates in a row had a non-finite critic loss.*"
                                             "max_skipped_steps"):
        guard.backward_and_step(engine, engine(torch.ones(1, 3)).sum() * float("inf"), "critic")


def test_a_diverged_policy_is_named_with_the_settings():
    actor = tiny_llama()
    g, prompt_mask = rollout(torch.Generator().manual_seed(3))
    g.logprobs[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"policy's log-probs are non-finite for 1 tokens "
                                             r"\(rows \[1\]\).*rl.actor_lr"):
        make_experience(g, prompt_mask, actor=actor, reference=None, reward_fn=score_fn,
                        algorithm=get_algorithm("ppo"), hp=RLHParams(kl_ctl=0.0),
                        critic=TinyCritic(), use_behaviour_logprobs=True)


def test_kl_overflow_in_a_run_is_skipped_then_stops(tmp_path):
    # kl_ctl 1e38 makes rewards of ~1e31: the gradients overflow, every update is skipped, and
    # two in a row stop the run
    cfg = tiny_config(tmp_path, {"rl.kl_ctl": 1e38, "max_skipped_steps": 2})
    run_rm(cfg)  # the critic starts from the reward model
    with pytest.raises(NonFiniteError, match=r"rl iteration 2: 2 updates in a row had a "
                                             r"non-finite (actor|critic) loss or gradient.*"
                                             r"max_skipped_steps"):
        rl_trainer.run_rl(cfg)


def test_reward_function_that_never_returns_times_out():
    never = threading.Event()

    def stuck(prompts, responses):
        never.wait()

    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"reward function .*stuck did not return within "
                                           r"0.3 s \(rl.reward_timeout"):
        score_with_fn(stuck, ["p"], ["r"], timeout=0.3)
    assert time.monotonic() - start < 5
    never.set()


def test_reward_timeout_keeps_results_and_errors():
    assert score_with_fn(lambda p, r: [1.5], ["p"], ["r"], timeout=5).tolist() == [1.5]

    def broken(prompts, responses):
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        score_with_fn(broken, ["p"], ["r"], timeout=5)


def test_the_trainer_passes_reward_timeout(tmp_path):
    cfg = tiny_config(tmp_path, {"rl.reward": "rlhf.data.synthetic:rule_score",
                                 "rl.reward_timeout": 7.5})
    assert rl_trainer._scorer(cfg, types.SimpleNamespace()).timeout == 7.5


def test_supervised_steps_skip_non_finite_losses(tmp_path, monkeypatch):
    from rlhf.trainers import sft
    real = sft.SupervisedStep

    def nan_every_other(**fields):  # the SFT loss, NaN on every second micro-batch
        loss_fn, calls = fields["batch_loss"], []

        def batch_loss(engine, batch):
            loss, extra = loss_fn(engine, batch)
            calls.append(1)
            return (loss * float("nan") if len(calls) % 2 == 0 else loss), extra
        return real(**{**fields, "batch_loss": batch_loss})

    monkeypatch.setattr(sft, "SupervisedStep", nan_every_other)
    cfg = tiny_config(tmp_path, {"sft.max_steps": 4})
    sft.run_sft(cfg)
    rows = [r for r in read_jsonl(tmp_path / "sft" / "metrics-sft.jsonl")]
    assert [r.get("skipped_updates", 0.0) for r in rows] == [0.0, 1.0, 0.0, 1.0]
    cfg = tiny_config(tmp_path / "again", {"sft.max_steps": 4, "max_skipped_steps": 1})
    with pytest.raises(NonFiniteError, match="non-finite sft loss.*max_skipped_steps"):
        sft.run_sft(cfg)


def test_a_nan_policy_in_the_rollout_names_the_iteration_and_settings(monkeypatch):
    from rlhf_kernels import NonFiniteLogitsError
    ones = torch.ones(2, 3, dtype=torch.long)
    monkeypatch.setattr(rl_trainer, "collate", lambda dataset, rows: {
        "input_ids": ones, "attention_mask": ones, "prompts": ["a", "b"]})

    def generate(*args, **kwargs):
        raise NonFiniteLogitsError("generate: the logits of sequence(s) [1] hold NaN")

    rl = types.SimpleNamespace(max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0)
    run = types.SimpleNamespace(cfg=types.SimpleNamespace(rl=rl), samples_per_prompt=1,
                                actor=types.SimpleNamespace(device="cpu"), prompts=None,
                                order=types.SimpleNamespace(batch=lambda it: [0, 1]),
                                hybrid=types.SimpleNamespace(generate=generate),
                                generators={"sample": None})
    with pytest.raises(NonFiniteError, match=r"rl iteration 3: rollout: generate: .*hold NaN.*"
                                             r"rl.actor_lr"):
        rl_trainer.rollout(run, 2)
