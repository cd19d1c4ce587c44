"""Losses against the PPO formulas written out here in plain torch, and minibatch updates with
plain torch optimizers behind TorchEngine."""
import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.algorithms import (Experience, RLHParams, TorchEngine, actor_loss, critic_loss,
                             get_algorithm, make_experience, ptx_loss, response_logprobs,
                             train_step)
from rlhf.data.tokenized import IGNORE_INDEX
from test_algorithms_models import TinyCritic, full_mask, rollout, score_fn, tiny_llama


def reference_actor_loss(model, exp, *, clip, kl_coef, entropy_coef, temperature, agg):
    """Clipped PPO + k3 KL - entropy, from a plain forward and log_softmax."""
    P = exp.prompt_len
    positions = (exp.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=exp.sequences, attention_mask=exp.attention_mask,
                   position_ids=positions).logits
    logp_all = torch.log_softmax(logits[:, P - 1:-1] / temperature, -1)
    logp = logp_all.gather(-1, exp.responses[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = torch.exp(logp - exp.old_logprobs)
    unclipped = -exp.advantages * ratio
    clipped = -exp.advantages * ratio.clamp(1 - clip, 1 + clip)
    log_ref_ratio = exp.ref_logprobs - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = torch.maximum(unclipped, clipped) + kl_coef * kl - entropy_coef * entropy
    m = exp.action_mask.float()
    if agg == "token-mean":
        loss = (per_token * m).sum() / m.sum()
    else:  # seq-mean-token-mean; every row here has a token
        loss = ((per_token * m).sum(1) / m.sum(1)).mean()
    clipfrac = (clipped > unclipped)[exp.action_mask].float().mean()
    return loss, clipfrac


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_actor_loss_matches_formula_and_gradient(agg):
    model = tiny_llama()
    gen = torch.Generator().manual_seed(7)
    g, prompt_mask = rollout(gen)
    mask = full_mask(g, prompt_mask)
    with torch.no_grad():
        logp = response_logprobs(model, g.sequences, mask, 5, temperature=0.8)
    # ratios exp(-offset) inside the clip range [0.8, 1.2], just outside it, far outside it;
    # none near the kinks, where the gradient is undefined
    offsets = torch.tensor([-0.6, -0.25, -0.05, 0.05, 0.35, 0.6])
    offsets = offsets[torch.randint(0, 6, logp.shape, generator=gen)]
    exp = Experience(g.sequences, mask, g.response_mask.bool(), 5, old_logprobs=logp + offsets,
                     ref_logprobs=logp + 0.3 * torch.randn(logp.shape, generator=gen),
                     advantages=torch.randn(logp.shape, generator=gen))
    hp = RLHParams(kl_ctl=0.05, entropy_coef=0.01, temperature=0.8, loss_agg=agg, cliprange=0.2)
    # grpo: the KL is a loss term, k3 by default
    loss, stats = actor_loss(model, exp, hp, get_algorithm("grpo"))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    want, want_clipfrac = reference_actor_loss(model, exp, clip=0.2, kl_coef=0.05,
                                               entropy_coef=0.01, temperature=0.8, agg=agg)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert 0 < float(want_clipfrac) < 1
    torch.testing.assert_close(stats["clipfrac"], want_clipfrac)
    assert set(stats) == {"actor_loss", "clipfrac", "approx_kl", "entropy", "ratio", "kl"}
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
    for got, ref in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_actor_loss_errors():
    g, prompt_mask = rollout(torch.Generator().manual_seed(8))
    exp = Experience(g.sequences, full_mask(g, prompt_mask), g.response_mask.bool(), 5,
                     old_logprobs=g.logprobs)
    grpo = get_algorithm("grpo")
    with pytest.raises(ValueError, match="has no advantages"):
        actor_loss(tiny_llama(), exp, RLHParams(), grpo)
    exp.advantages = torch.zeros_like(g.logprobs)
    with pytest.raises(ValueError, match="kl_coef != 0 needs ref_logprobs"):
        actor_loss(tiny_llama(), exp, RLHParams(kl_ctl=0.1), grpo)


def test_critic_loss_matches_formula_and_trains_the_critic():
    critic = TinyCritic()
    gen = torch.Generator().manual_seed(9)
    g, prompt_mask = rollout(gen)
    mask = full_mask(g, prompt_mask)
    with torch.no_grad():
        values = critic(g.sequences, mask)[:, 4:-1]
    old = values + 0.5 * torch.randn(values.shape, generator=gen)
    returns = torch.randn(values.shape, generator=gen)
    exp = Experience(g.sequences, mask, g.response_mask.bool(), 5, old_logprobs=g.logprobs,
                     values=old, returns=returns)
    loss, stats = critic_loss(critic, exp, RLHParams(cliprange_value=0.2))
    v = critic(g.sequences, mask)[:, 4:-1]
    v_clipped = old + (v - old).clamp(-0.2, 0.2)
    per_token = 0.5 * torch.maximum((v - returns) ** 2, (v_clipped - returns) ** 2)
    m = exp.action_mask
    torch.testing.assert_close(loss, per_token[m].mean())
    grads = torch.autograd.grad(loss, list(critic.parameters()))
    want = torch.autograd.grad(per_token[m].mean(), list(critic.parameters()))
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref)
    assert 0 < float(stats["critic_clipfrac"]) < 1
    exp.returns = None
    with pytest.raises(ValueError, match="needs experience.values and experience.returns"):
        critic_loss(critic, exp, RLHParams())


def test_ptx_loss_is_cross_entropy():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(10)
    ids = torch.randint(0, 37, (3, 8), generator=gen)
    attention = torch.ones_like(ids)
    attention[2, 5:] = 0  # right padding
    labels = torch.where(attention.bool(), ids, IGNORE_INDEX)
    labels[0, :3] = IGNORE_INDEX  # a masked prompt
    logits = model(input_ids=ids, attention_mask=attention).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 37), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)
    got = ptx_loss(model, {"input_ids": ids, "attention_mask": attention, "labels": labels})
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    default = ptx_loss(model, {"input_ids": ids, "attention_mask": attention})
    labels_all = torch.where(attention.bool(), ids, IGNORE_INDEX)
    torch.testing.assert_close(default, F.cross_entropy(
        logits[:, :-1].reshape(-1, 37), labels_all[:, 1:].reshape(-1)), atol=1e-5, rtol=1e-5)
    assert default.requires_grad
    with pytest.raises(ValueError, match="the ptx batch needs 'attention_mask'"):
        ptx_loss(model, {"input_ids": ids})


def test_torch_engine_accumulates_then_steps():
    layer = torch.nn.Linear(2, 1, bias=False)
    engine = TorchEngine(layer, torch.optim.SGD(layer.parameters(), lr=1.0),
                         gradient_accumulation_steps=2)
    start = layer.weight.detach().clone()
    x = torch.tensor([[1.0, 2.0]])
    engine.backward(engine(x).sum())
    engine.step()
    assert torch.equal(layer.weight, start)  # not yet at the boundary
    engine.backward(engine(x).sum())
    engine.step()
    # two micro batches of gradient x, each scaled by 1/2
    torch.testing.assert_close(layer.weight.detach(), start - x)
    assert layer.weight.grad is None
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be >= 1"):
        TorchEngine(layer, engine.optimizer, gradient_accumulation_steps=0)


def engines(actor, critic, lr=1e-2):
    return (TorchEngine(actor, torch.optim.Adam(actor.parameters(), lr=lr)),
            TorchEngine(critic, torch.optim.Adam(critic.parameters(), lr=lr)))


def test_ppo_train_step_updates_actor_and_critic():
    actor, critic = tiny_llama(0), TinyCritic()
    g, prompt_mask = rollout(torch.Generator().manual_seed(11))
    hp = RLHParams(train_batch_size=2, ppo_epochs=2)
    algo = get_algorithm("ppo")
    exp = make_experience(g, prompt_mask, actor=actor, reference=tiny_llama(0), critic=critic,
                          reward_fn=score_fn, algorithm=algo, hp=hp)
    before = [p.detach().clone() for p in (*actor.parameters(), *critic.parameters())]
    ptx = [{"input_ids": g.sequences, "attention_mask": full_mask(g, prompt_mask)}]
    stats = train_step(*engines(actor, critic), exp, algo, hp, ptx_batches=ptx,
                       generator=torch.Generator().manual_seed(0))
    after = [*actor.parameters(), *critic.parameters()]
    changed = [not torch.equal(b, a) for b, a in zip(before, after, strict=True)]
    assert all(changed[:len(list(actor.parameters()))]) and all(changed[-2:])
    assert {"actor_loss", "critic_loss", "clipfrac", "approx_kl", "entropy",
            "ptx_loss"} <= set(stats)
    assert "kl" not in stats  # ppo's KL shapes the reward: the loss has no KL term
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce"])
def test_repeated_updates_raise_likelihood_of_positive_advantage_tokens(name):
    actor = tiny_llama(0)
    g, prompt_mask = rollout(torch.Generator().manual_seed(12))
    hp = RLHParams(train_batch_size=4, num_samples=2, kl_ctl=0.0)
    algo = get_algorithm(name)
    exp = make_experience(g, prompt_mask, actor=actor, reference=None,
                          reward_fn=lambda *a: torch.tensor([1.0, -1.0, -1.0, 1.0]),
                          algorithm=algo, hp=hp)
    positive, negative = exp.advantages > 0, exp.advantages < 0
    assert positive.any() and negative.any()
    engine = TorchEngine(actor, torch.optim.Adam(actor.parameters(), lr=3e-3))
    for _ in range(4):
        train_step(engine, None, exp, algo, hp)
    with torch.no_grad():
        logp = response_logprobs(actor, exp.sequences, exp.attention_mask, exp.prompt_len)
    assert logp[positive].mean() > exp.old_logprobs[positive].mean() + 0.05
    assert logp[negative].mean() < exp.old_logprobs[negative].mean() - 0.05


def test_train_step_errors():
    actor = tiny_llama()
    g, prompt_mask = rollout(torch.Generator().manual_seed(13))
    exp = Experience(g.sequences, full_mask(g, prompt_mask), g.response_mask.bool(), 5,
                     old_logprobs=g.logprobs)
    engine = TorchEngine(actor, torch.optim.SGD(actor.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="algorithm 'ppo' needs a critic engine"):
        train_step(engine, None, exp, get_algorithm("ppo"), RLHParams())
    with pytest.raises(ValueError, match="has no advantages"):
        train_step(engine, None, exp, get_algorithm("grpo"), RLHParams())
