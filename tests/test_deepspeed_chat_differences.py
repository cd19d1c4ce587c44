"""Where this trainer departs from DeepSpeed-Chat's step 3 (the README's "Differences from
DeepSpeed-Chat"): each difference runs both conventions on the same inputs and asserts exactly
where they agree and where they differ. DeepSpeed-Chat's side is the float64 restatement in
deepspeed_chat_reference.py (`ds`); ours is the project's code.

Column i of a [B, N] tensor is response token i in both conventions (ds works on the T - 1
shifted positions; `x[:, P - 1:]` are the response columns).
"""
import copy
import dataclasses
import types

import pytest
import torch

import deepspeed_chat_reference as ds
import tiny_models
from rlhf.algorithms import (Experience, RLHParams, TorchEngine, gae_advantages,
                             get_algorithm, kl_shaped_rewards, make_experience,
                             response_logprobs, rollouts_to_keep, score_at_last_token,
                             train_step)
from rlhf.config import RLConfig, RunConfig
from rlhf_kernels.generation.fallback import response_mask_from
from rlhf_kernels.reference.gae import gae as gae_float64

F64 = torch.float64
P, N = 3, 6
EOS = 2
# the responses before padding: EOS in the middle, no EOS (full length), a token + EOS,
# EOS alone, EOS in the last column
RESPONSES = [[7, 8, EOS], [7, 8, 9, 10, 11, 12], [7, EOS], [EOS], [7, 8, 9, 10, 11, EOS]]
PROMPT_PADDING = [1, 0, 2, 0, 1]


def rollout(pad):
    """[B, P+N] left padded prompts + responses padded after EOS with `pad` (as HF generate
    pads), and our action mask (the generation's response mask: up to and including EOS)."""
    rows = []
    for left, response in zip(PROMPT_PADDING, RESPONSES, strict=True):
        prompt = [pad] * left + [4, 5, 6][left:]
        rows.append(prompt + response + [pad] * (N - len(response)))
    seq = torch.tensor(rows)
    ours = response_mask_from(seq[:, P:], torch.tensor([EOS])).bool()
    return seq, ours


def eos_column(seq):
    """[B] column of the first EOS of each response, -1 without one."""
    is_eos = seq[:, P:] == EOS
    return torch.where(is_eos.any(1), is_eos.long().argmax(1), -1)


def dyadic(shape, gen, scale=64):
    """float64 values with few mantissa bits: float32 arithmetic on them (differences, times
    1/8, sums of a few) is exact, so our float32 rewards are exactly the float64 ones."""
    return torch.randint(-2 * scale, 2 * scale, shape, generator=gen).to(F64) / scale


def hparams(**values):
    """RLHParams under the new field names (train_batch_size, num_samples, loss_agg), mapped
    to the old ones while hparams.py still has them."""
    names = {f.name for f in dataclasses.fields(RLHParams)}
    old = {"train_batch_size": "micro_batch_size", "num_samples": "group_size",
           "loss_agg": "agg"}
    return RLHParams(**{(k if k in names else old[k]): v for k, v in values.items()})


KL_CTL = 0.125  # a power of two: -kl_ctl * kl is exact in float32 for dyadic inputs
SCORES = torch.tensor([1.5, -2.25, 0.75, 3.0, -1.0], dtype=F64)


def shaping_inputs(seed=0):
    """Per-response-token log-probs [B, N] and the same on ds's shifted [B, T-1] positions,
    whose prompt positions hold junk (ds puts a KL term there; it is never read)."""
    gen = torch.Generator().manual_seed(seed)
    logp, ref = dyadic((5, N), gen) - 2, dyadic((5, N), gen) - 2
    values = dyadic((5, N), gen)
    junk = lambda: dyadic((5, P - 1), gen) * 10  # noqa: E731
    shift = lambda x: torch.cat([junk(), x], 1)  # noqa: E731
    return logp, ref, values, shift(logp), shift(ref), shift(values)


def ours_rewards(scores, logp, ref, mask, kl_ctl=KL_CTL):
    return kl_shaped_rewards(scores.float(), logp.float(), ref.float(), mask, kl_ctl=kl_ctl,
                             clip_reward_value=5.0).double()


def ds_rewards(seq, pad, scores, logp_s, ref_s, values_s):
    """ds rewards on the response columns, after zeroing past the end (what its GAE reads)."""
    r = ds.rewards(seq, P, pad, logp_s, ref_s, scores, kl_ctl=KL_CTL, clip_reward_value=5.0)
    r, _ = ds.zero_after_end(r, values_s, seq, P, pad)
    return r[:, P - 1:]


# ------------------------------------------------------------------ 1. where the score lands

def test_score_position_pad_differs_from_eos():
    seq, ours_mask = rollout(pad=0)
    ds_col = ds.score_position(seq, P, 0)
    ours = score_at_last_token(SCORES.float(), ours_mask)
    ours_col = ours.abs().argmax(1)
    assert torch.equal(ours[torch.arange(5), ours_col].double(), SCORES)
    # ours: the EOS itself; ds: the column after it (the first pad)
    assert ours_col.tolist() == [2, 5, 1, 0, 5]
    assert ds_col.tolist() == [3, 5, 2, 1, 5]
    ended_early = eos_column(seq).ne(-1) & eos_column(seq).lt(N - 1)
    assert torch.equal(ds_col[ended_early], ours_col[ended_early] + 1)
    # a response that fills the N columns (with or without EOS): the same, the last column
    assert torch.equal(ds_col[~ended_early], ours_col[~ended_early])
    assert ds_col[~ended_early].tolist() == [N - 1, N - 1]


def test_score_position_same_when_pad_is_eos():
    seq, ours_mask = rollout(pad=EOS)
    ds_col = ds.score_position(seq, P, EOS)
    ours_col = score_at_last_token(SCORES.float(), ours_mask).abs().argmax(1)
    # EOS is a pad to ds, so "after the last non-pad token" is the EOS: both at EOS
    assert ds_col.tolist() == ours_col.tolist() == [2, 5, 1, 0, 5]


def test_per_token_rewards_pad_differs_from_eos():
    seq, mask = rollout(pad=0)
    logp, ref, values, logp_s, ref_s, values_s = shaping_inputs(1)
    want, got = ds_rewards(seq, 0, SCORES, logp_s, ref_s, values_s), ours_rewards(
        SCORES, logp, ref, mask)
    kl = -KL_CTL * (logp - ref)
    rows = torch.arange(5)
    ds_col = ds.score_position(seq, P, 0)
    ours_col = score_at_last_token(SCORES.float(), mask).abs().argmax(1)
    # the KL parts: equal on our action mask (exact: dyadic inputs)
    assert torch.equal(torch.where(mask, got, 0.0),
                       torch.where(mask, kl, 0.0) + _one_hot(ours_col, SCORES))
    ds_span = torch.arange(N)[None, :] <= ds_col[:, None]  # columns ds keeps: mask + 1 slot
    assert torch.equal(want, torch.where(ds_span, kl, 0.0) + _one_hot(ds_col, SCORES))
    # ds's extra slot (the first pad after EOS) holds its KL and the score; ours holds nothing
    extra = ds_span & ~mask
    assert extra.sum(1).tolist() == [1, 0, 1, 1, 0]
    assert torch.equal(got[extra], torch.zeros(3, dtype=F64))
    assert torch.equal(want[extra], kl[extra] + SCORES[rows[extra.any(1)]])
    # the totals differ only by the moved score's column and the extra KL
    assert torch.equal(want.sum(1) - got.sum(1), torch.where(extra, kl, 0.0).sum(1))


def test_per_token_rewards_same_when_pad_is_eos_or_full_length():
    seq, mask = rollout(pad=EOS)
    logp, ref, values, logp_s, ref_s, values_s = shaping_inputs(2)
    want = ds_rewards(seq, EOS, SCORES, logp_s, ref_s, values_s)
    assert torch.equal(ours_rewards(SCORES, logp, ref, mask), want)
    # with pad != EOS, rows that fill the N columns agree too
    seq, mask = rollout(pad=0)
    want = ds_rewards(seq, 0, SCORES, logp_s, ref_s, values_s)
    full = torch.tensor([1, 4])
    assert torch.equal(ours_rewards(SCORES, logp, ref, mask)[full], want[full])


def _one_hot(columns, scores):
    out = torch.zeros(len(columns), N, dtype=F64)
    out[torch.arange(len(columns)), columns] = scores.clamp(-5, 5)
    return out


# ----------------------------------------------------------------- 2. EOS in the action mask

def test_eos_in_action_mask():
    for pad in (0, EOS):
        seq, ours = rollout(pad)
        theirs = ds.response_loss_mask(seq, P, pad).bool()
        eos = eos_column(seq)
        if pad != EOS:
            assert torch.equal(ours, theirs)  # EOS is a real token to both
            continue
        # pad == EOS: ds masks EOS out (it is a pad to it); ours keeps it: the masks differ
        # exactly at the EOS column of the rows that have one
        assert torch.equal(ours & ~theirs, _columns(eos))
        assert not (theirs & ~ours).any()
        assert theirs.sum(1).tolist() == [2, 6, 1, 0, 5]
        assert ours.sum(1).tolist() == [3, 6, 2, 1, 6]


def _columns(cols):
    out = torch.zeros(len(cols), N, dtype=torch.bool)
    has = cols >= 0
    out[torch.arange(len(cols))[has], cols[has]] = True
    return out


# ------------------------------------------------------------------------------------ 3. GAE

@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_differs_only_through_the_extra_slot(gamma, lam):
    seq, mask = rollout(pad=0)
    logp, ref, values, logp_s, ref_s, values_s = shaping_inputs(3)
    _, adv_ds, ret_ds, loss_mask = ds.advantages_and_returns(
        seq, P, 0, logp_s, ref_s, values_s, SCORES, kl_ctl=KL_CTL, gamma=gamma, lam=lam)
    assert torch.equal(loss_mask.bool(), mask)  # pad != EOS: the same tokens are trained
    rewards = ours_rewards(SCORES, logp, ref, mask)
    adv, ret = gae_float64(rewards, values, mask, gamma, lam, "zero")
    # the project's op (float32 out) is this recursion
    adv32, ret32 = gae_advantages(rewards.float(), values.float(), mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv32.double(), adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret32.double(), ret, atol=1e-5, rtol=1e-5)

    eos = eos_column(seq)
    slot = ds.score_position(seq, P, 0)
    extra = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)  # rows that ended before column N-1
    diff = torch.where(mask, adv_ds - adv, 0.0)
    # rows without the extra slot: identical
    torch.testing.assert_close(diff[~extra], torch.zeros_like(diff[~extra]), atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(torch.where(mask, ret_ds - ret, 0.0)[~extra],
                               torch.zeros_like(diff[~extra]), atol=1e-12, rtol=0)
    # rows with it: at EOS, ds sees gamma * V_slot + gamma * lam * (KL_slot + s - V_slot) where
    # ours sees s; the gap then decays by gamma * lam per earlier token
    kl = -KL_CTL * (logp - ref)
    for row in torch.nonzero(extra).flatten().tolist():
        e, k = int(eos[row]), int(slot[row])
        assert k == e + 1
        s, v_slot, kl_slot = SCORES[row].clamp(-5, 5), values[row, k], kl[row, k]
        at_eos = gamma * v_slot + gamma * lam * (kl_slot + s - v_slot) - s
        want = at_eos * (gamma * lam) ** torch.arange(e, -1, -1, dtype=F64)
        torch.testing.assert_close(diff[row, :e + 1], want, atol=1e-12, rtol=0)
        assert abs(float(at_eos)) > 1e-3
    assert (diff[extra].abs().amax(1) > 1e-3).all()


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_agrees_without_the_extra_slot(gamma, lam):
    """ds's pipeline with the slot's KL and value zeroed and the score moved to EOS gives our
    advantages and returns on every trained token, to float64 rounding."""
    seq, mask = rollout(pad=0)
    logp, ref, values, logp_s, ref_s, values_s = shaping_inputs(4)
    rows = torch.arange(5)
    slot = ds.score_position(seq, P, 0) + (P - 1)  # shifted position of ds's score
    has_slot = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    r = ds.rewards(seq, P, 0, logp_s, ref_s, torch.zeros(5, dtype=F64), kl_ctl=KL_CTL)
    v = values_s.clone()
    r[rows[has_slot], slot[has_slot]] = 0.0  # the slot's KL ...
    v[rows[has_slot], slot[has_slot]] = 0.0  # ... and value gone
    last = score_at_last_token(torch.ones(5), mask).argmax(1) + (P - 1)
    r[rows, last] += SCORES.clamp(-5, 5)  # the score at the last trained token
    r, v = ds.zero_after_end(r, v, seq, P, 0)
    adv_ds, ret_ds = ds.gae(v, r, P - 1, gamma=gamma, lam=lam)
    adv, ret = gae_float64(ours_rewards(SCORES, logp, ref, mask), values, mask, gamma, lam,
                           "zero")
    torch.testing.assert_close(torch.where(mask, adv_ds, 0.0), adv, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.where(mask, ret_ds, 0.0), ret, atol=1e-12, rtol=0)


def test_gae_agrees_with_gamma_lambda_one_once_the_slot_is_empty():
    """With gamma = lam = 1 the score reaches EOS undiscounted from ds's slot: zeroing only the
    slot's KL and value (the score stays where ds puts it) already gives our advantages."""
    seq, mask = rollout(pad=0)
    logp, ref, values, logp_s, ref_s, values_s = shaping_inputs(5)
    slot = ds.score_position(seq, P, 0) + (P - 1)
    ref_s, values_s = ref_s.clone(), values_s.clone()
    ref_s[torch.arange(5), slot] = logp_s[torch.arange(5), slot]  # KL 0 at the slot
    values_s[torch.arange(5), slot] = 0.0
    logp, ref, values = logp_s[:, P - 1:], ref_s[:, P - 1:], values_s[:, P - 1:]
    _, adv_ds, ret_ds, _ = ds.advantages_and_returns(seq, P, 0, logp_s, ref_s, values_s, SCORES,
                                                     kl_ctl=KL_CTL, gamma=1.0, lam=1.0)
    adv, ret = gae_float64(ours_rewards(SCORES, logp, ref, mask), values, mask, 1.0, 1.0,
                           "zero")
    torch.testing.assert_close(torch.where(mask, adv_ds, 0.0), adv, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.where(mask, ret_ds, 0.0), ret, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ 4. short-rollout drop rule

def ours_keep(action_mask, min_response_tokens):
    """[B] bool from our rule (rlhf.algorithms.rollouts_to_keep, as rl.min_response_tokens
    applies it): rows with at least min_response_tokens response tokens, EOS included."""
    keep = torch.zeros(action_mask.shape[0], dtype=torch.bool)
    keep[rollouts_to_keep(action_mask, min_response_tokens)] = True
    return keep


def test_drop_rule_default_matches_when_pad_differs_from_eos():
    default = RLConfig().min_response_tokens
    assert default == 2
    seq, mask = rollout(pad=0)
    theirs = ds.keep_rows(seq, P, 0)
    assert theirs.tolist() == [True, True, True, False, True]  # EOS alone is dropped
    assert torch.equal(ours_keep(mask, default), theirs)


def test_drop_rule_differs_when_pad_is_eos():
    seq, mask = rollout(pad=EOS)
    theirs, ours = ds.keep_rows(seq, P, EOS), ours_keep(mask, RLConfig().min_response_tokens)
    # "token EOS": one token to ds (EOS is a pad), two to us
    assert theirs.tolist() == [True, True, False, False, True]
    assert ours.tolist() == [True, True, True, False, True]


def test_drop_rule_reuses_the_last_batch_when_all_are_short():
    keep = ds.RolloutFilter(pad_token_id=0)
    seq, _ = rollout(pad=0)
    prompts = seq[:, :P]
    kept_prompts, kept = keep(prompts, seq)
    assert torch.equal(kept, seq[[0, 1, 2, 4]]) and torch.equal(kept_prompts, prompts)
    short = seq.clone()
    short[:, P:] = 0
    short[:, P] = EOS  # every response is EOS alone
    again_prompts, again = keep(short[:, :P], short)
    assert torch.equal(again, kept) and torch.equal(again_prompts, prompts)
    with pytest.raises(RuntimeError, match="no earlier batch"):
        ds.RolloutFilter(0)(short[:, :P], short)


# ---------------------------------------------------------------- 5. ptx (pretraining) loss

def _tiny_actor():
    # a model without a fused adapter: both conventions run the same Hugging Face forward, so
    # only the conventions differ (our fused Llama forward matches HF's to float32 rounding)
    return tiny_models.build(tiny_models.FALLBACK, seed=3, dtype=F64)


class _Critic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.embed = torch.nn.Embedding(tiny_models.VOCAB, 1, dtype=F64)

    def forward(self, input_ids, attention_mask):
        return self.embed(input_ids).squeeze(-1)


def _ptx_setup():
    """A tiny float64 actor, one experience (prompts without padding, responses padded after
    EOS with pad 0) and one pretraining batch."""
    gen = torch.Generator().manual_seed(9)
    b, p, n = 3, 4, 5
    seq = torch.randint(3, tiny_models.VOCAB, (b, p + n), generator=gen)
    seq[0, p + 2], seq[0, p + 3:] = EOS, 0
    seq[1, p + 3], seq[1, p + 4:] = EOS, 0
    action = response_mask_from(seq[:, p:], torch.tensor([EOS])).bool()
    attention = torch.cat([torch.ones(b, p, dtype=torch.long), action.long()], 1)
    assert torch.equal(attention, ds.attention_mask(seq, 0))  # pad != EOS: the same masks
    actor = _tiny_actor()
    with torch.no_grad():
        logp = response_logprobs(actor, seq, attention, p).double()
    offsets = 0.05 * torch.randn(b, n, generator=gen, dtype=F64)
    advantages = torch.where(action, torch.randn(b, n, generator=gen, dtype=F64), 0.0)
    exp = Experience(seq, attention, action, p, old_logprobs=torch.where(action, logp + offsets,
                                                                         0.0),
                     values=torch.zeros(b, n, dtype=F64), returns=advantages.clone(),
                     advantages=advantages)
    ptx_ids = torch.randint(3, tiny_models.VOCAB, (2, 7), generator=gen)
    ptx = {"input_ids": ptx_ids, "attention_mask": torch.ones_like(ptx_ids)}
    return actor, exp, ptx


def _ours_step(actor, exp, ptx, ptx_coef, lr):
    """One train_step: ptx_coef x the ptx loss added to the actor loss (ptx=None: no mixing)."""
    engine = TorchEngine(actor, torch.optim.SGD(actor.parameters(), lr=lr))
    critic = _Critic()
    critic_engine = TorchEngine(critic, torch.optim.SGD(critic.parameters(), lr=lr))
    hp = hparams(ptx_coef=ptx_coef, train_batch_size=exp.batch_size, ppo_epochs=1)
    train_step(engine, critic_engine, exp, get_algorithm("ppo"), hp,
               ptx_batches=None if ptx is None else [ptx])
    return [p.detach().clone() for p in actor.parameters()]


def _ds_losses(actor, exp, ptx):
    start = exp.prompt_len - 1

    def ppo():
        logp = ds.shifted_logprobs(actor, exp.sequences, 0)[:, start:]
        mask = ds.response_loss_mask(exp.sequences, exp.prompt_len, 0)
        return ds.actor_loss(logp, exp.old_logprobs, exp.advantages, mask)

    def lm():
        return ds.ptx_loss(actor, ptx["input_ids"], ptx["attention_mask"], ptx["input_ids"])

    return ppo, lm


def _ds_steps(actor, exp, ptx, ptx_coef, lr, accumulation=None):
    """ds's actor update on an engine that, like DeepSpeed, scales each backward by 1 /
    accumulation steps and applies the optimizer at the accumulation boundary; by default
    ds's own accumulation (doubled with ptx). ptx=None: no mixing (one backward, one step)."""
    if accumulation is None:
        accumulation = ds.actor_accumulation_steps(1, ptx is not None)
    engine = TorchEngine(actor, torch.optim.SGD(actor.parameters(), lr=lr),
                         gradient_accumulation_steps=accumulation)
    ppo, lm = _ds_losses(actor, exp, ptx)
    if ptx is None:
        engine.backward(ppo())
        engine.step()
    else:
        ds.ppo_then_ptx_steps(engine, ppo, lm, ptx_coef)
    return [p.detach().clone() for p in actor.parameters()]


def _ptx_grads(params, template, ptx):
    model = copy.deepcopy(template)
    with torch.no_grad():
        for dst, src in zip(model.parameters(), params, strict=True):
            dst.copy_(src)
    loss = ds.ptx_loss(model, ptx["input_ids"], ptx["attention_mask"], ptx["input_ids"])
    return torch.autograd.grad(loss, list(model.parameters()))


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _assert_all_close(a, b, atol=1e-12):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def test_ptx_one_backward_vs_two_accumulated_backwards():
    lr, coef = 0.5, 2.0
    actor, exp, ptx = _ptx_setup()
    w0 = [p.detach().clone() for p in actor.parameters()]
    # without ptx: the same update
    ours = _ours_step(copy.deepcopy(actor), exp, None, 0.0, lr)
    assert _max_diff(ours, w0) > 1e-2
    _assert_all_close(_ds_steps(copy.deepcopy(actor), exp, None, 0.0, lr), ours)
    # with ptx (coef 0 included): ds sums the PPO and the ptx gradient at the same weights,
    # each halved by its doubled accumulation, in one optimizer step; ours takes the full sum.
    # The same direction; under SGD ds's step is half ours
    for c in (0.0, coef):
        ours = _ours_step(copy.deepcopy(actor), exp, ptx, c, lr)
        theirs = _ds_steps(copy.deepcopy(actor), exp, ptx, c, lr)
        assert _max_diff(ours, theirs) > 1e-2
        _assert_all_close([t - w for t, w in zip(theirs, w0)],
                          [(o - w) / 2 for o, w in zip(ours, w0)])
    # ours with ptx_coef 0 is ours without ptx
    _assert_all_close(_ours_step(copy.deepcopy(actor), exp, ptx, 0.0, lr),
                      _ours_step(copy.deepcopy(actor), exp, None, 0.0, lr))
    # were each step() an optimizer step (accumulation 1), the ptx gradient would be taken at
    # the weights w1 the PPO step moved to: off ours by lr * c * (g_ptx(w0) - g_ptx(w1))
    literal = _ds_steps(copy.deepcopy(actor), exp, ptx, coef, lr, accumulation=1)
    ours = _ours_step(copy.deepcopy(actor), exp, ptx, coef, lr)
    w1 = _ours_step(copy.deepcopy(actor), exp, None, 0.0, lr)
    g0, g1 = _ptx_grads(w0, actor, ptx), _ptx_grads(w1, actor, ptx)
    _assert_all_close([t - o for t, o in zip(literal, ours)],
                      [lr * coef * (a - b) for a, b in zip(g0, g1)])


def test_ptx_deepspeed_engine_with_ds_chat_batch_config_steps_once():
    """DeepSpeed itself, configured as ds configures its actor when ptx is on (train batch =
    micro batch x world x 2, no clipping here), applies the optimizer once, after the ptx
    backward, on the sum of both halved gradients: what _ds_steps reproduces. float32
    (DeepSpeed reduces no float64 gradients)."""
    deepspeed = pytest.importorskip("deepspeed")
    from rlhf.engine import init_distributed
    init_distributed()
    actor, exp, ptx = _ptx_setup()
    actor = actor.float()
    exp = dataclasses.replace(exp, old_logprobs=exp.old_logprobs.float(),
                              advantages=exp.advantages.float())
    model = copy.deepcopy(actor)
    world = torch.distributed.get_world_size()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        config={"train_micro_batch_size_per_gpu": exp.batch_size,
                "train_batch_size": exp.batch_size * world * ds.actor_accumulation_steps(1, True),
                "gradient_clipping": 0.0})
    assert engine.gradient_accumulation_steps() == 2
    device = next(engine.module.parameters()).device  # DeepSpeed's accelerator
    ppo, lm = _ds_losses(engine.module, exp.to(device), {k: v.to(device) for k, v in ptx.items()})
    ds.ppo_then_ptx_steps(engine, ppo, lm, 2.0)
    assert engine.global_steps == 1
    got = [p.detach().cpu() for p in engine.module.parameters()]
    want = _ds_steps(copy.deepcopy(actor), exp, ptx, 2.0, 0.5)
    assert _max_diff(got, [p.detach() for p in actor.parameters()]) > 1e-2
    _assert_all_close(got, want, atol=1e-5)


# -------------------------------------------------------------------- 6. old log-probs source

def test_old_logprobs_behaviour_vs_recomputed():
    actor, exp, _ = _ptx_setup()
    p = exp.prompt_len
    with torch.no_grad():
        forward = ds.shifted_logprobs(actor, exp.sequences, 0)[:, p - 1:]
    # the sampler's log-probs: its own numerics, a little off the training forward
    sampler = (forward + 1e-3 * torch.arange(1, 6, dtype=F64)).float()
    generation = types.SimpleNamespace(sequences=exp.sequences, response_mask=exp.action_mask,
                                       logprobs=sampler)
    hp = hparams(kl_ctl=0.0)
    common = dict(actor=actor, reference=None, reward_fn=lambda *a: torch.ones(3),
                  algorithm=get_algorithm("reinforce"), hp=hp)
    prompt_mask = exp.attention_mask[:, :p]
    behaviour = make_experience(generation, prompt_mask, use_behaviour_logprobs=True, **common)
    recomputed = make_experience(generation, prompt_mask, use_behaviour_logprobs=False, **common)
    m = exp.action_mask
    # ours (default): the sampler's, as given; ds: a forward of the actor
    assert torch.equal(behaviour.old_logprobs[m], sampler[m])
    torch.testing.assert_close(recomputed.old_logprobs[m].double(), forward[m], atol=1e-6,
                               rtol=0)
    assert (behaviour.old_logprobs[m].double() - forward[m]).abs().min() > 5e-4
    if hasattr(RLConfig(), "recompute_logprobs"):
        assert RLConfig().recompute_logprobs is False


# ------------------------------------------------------------------------ 7. reward model init

def test_reward_model_starts_from_sft(tmp_path):
    from rlhf.trainers.reward import rm_init_path
    cfg = RunConfig()
    cfg.output = str(tmp_path)
    base = cfg.model.name_or_path
    assert str(rm_init_path(cfg)) == ds.reward_model_init(base) == base  # no SFT model yet
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text("{}")
    assert rm_init_path(cfg) == tmp_path / "sft"
    assert ds.reward_model_init(base, str(tmp_path / "sft")) == base
