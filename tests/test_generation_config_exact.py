"""apply_rlhf_kernels serves a `generate` call only when the effective generation config (HF's
own resolution of the call's config / kwargs over model.generation_config over transformers'
defaults) holds nothing but what the fused loop implements exactly; the rest goes to HF."""
import logging

import pytest
import torch
import transformers as tf

import rlhf_kernels.integrations.transformers as integration
from rlhf_kernels.generation import position_ids_from_mask
from rlhf_kernels.generation.fallback import response_mask_from
from rlhf_kernels.integrations.transformers import apply_rlhf_kernels

from hf_processing import first_token_logits, hf_first_token_probs, total_variation, tv_bound
from tiny_models import CONFIGS, build, left_padded_prompts


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    # "said once" starts over in each test
    monkeypatch.setattr(integration, "_said", set(), raising=False)


def test_every_generation_config_field_is_classified():
    """A field a new transformers adds fails here until it is put in SERVED or DECLINED."""
    fields = set(tf.GenerationConfig().to_dict())
    assert not integration.SERVED & integration.DECLINED
    assert fields - integration.SERVED - integration.DECLINED == set()
    # served with a distribution test each (test_served_sampling_matches_hf_distribution)
    assert {"min_p", "repetition_penalty", "suppress_tokens"} <= integration.USED


DECLINED_CASES = [
    dict(do_sample=False, no_repeat_ngram_size=2),
    dict(do_sample=False, bad_words_ids=[[11]]),
    dict(do_sample=False, num_beams=2),
    dict(do_sample=True, typical_p=0.5),
    dict(do_sample=False, forced_eos_token_id=5, eos_token_id=5),
    # HF applies min-p after top-p, whose kept set depends on what it is given: no
    # pre-filtering gives HF's set
    dict(do_sample=True, top_k=0, top_p=0.7, min_p=0.1),
    dict(do_sample=False, suppress_tokens=[-1, 7]),  # HF ignores -1, the fused loop refuses it
]


def _declined_name(options):
    return next(k for k in options if k not in ("do_sample", "top_k", "eos_token_id"))


@pytest.mark.parametrize("as_config", [False, True], ids=["kwargs", "generation_config"])
@pytest.mark.parametrize("options", DECLINED_CASES, ids=_declined_name)
def test_declined_option_takes_hf_path(options, as_config, rng, monkeypatch, caplog):
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    ids, mask = left_padded_prompts([4, 6, 3], rng)
    call = dict(max_new_tokens=10, pad_token_id=0, **options)
    torch.manual_seed(7)
    expected = model.generate(input_ids=ids, attention_mask=mask, **call)
    apply_rlhf_kernels(model)
    monkeypatch.setattr(integration, "generate", lambda *a, **k: pytest.fail("fused path used"))
    args = dict(generation_config=tf.GenerationConfig(**call)) if as_config else call
    with caplog.at_level(logging.WARNING, logger="rlhf_kernels.integrations"):
        torch.manual_seed(7)
        got = model.generate(input_ids=ids, attention_mask=mask, **args)
        model.generate(input_ids=ids, attention_mask=mask, **args)
    assert torch.equal(got, expected)
    said = [r.getMessage() for r in caplog.records if "falls back to HF" in r.getMessage()]
    assert len(said) == 1, said  # once, with the option named
    assert _declined_name(options) in said[0]


def spy_fused(monkeypatch):
    """The calls apply_rlhf_kernels sends to the fused loop."""
    used, fused = [], integration.generate
    monkeypatch.setattr(integration, "generate", lambda *a, **k: used.append(k) or fused(*a, **k))
    return used


def test_min_p_and_suppress_tokens_are_honoured(rng, monkeypatch):
    """The two reported cases, now on the fused path: min_p=0.5 emitted tokens below min_p,
    suppress_tokens emitted the suppressed token."""
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    ids, mask = left_padded_prompts([5] * 64, rng)
    greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                            do_sample=False, pad_token_id=0, eos_token_id=None)
    banned = int(greedy[0, 5])
    apply_rlhf_kernels(model)
    used = spy_fused(monkeypatch)
    config = tf.GenerationConfig(do_sample=False, suppress_tokens=[banned], max_new_tokens=6,
                                 pad_token_id=0)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert len(used) == 1 and not bool((out[:, 5:] == banned).any())
    config = tf.GenerationConfig(do_sample=True, min_p=0.5, top_k=0, temperature=2.0,
                                 max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert len(used) == 2
    full = torch.cat([mask, torch.ones_like(out[:, 5:])], 1)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=full).logits[:, 4:-1] / 2.0
    probs = logits.softmax(-1)
    chosen = probs.gather(-1, out[:, 5:, None])[..., 0]
    sampled = _sampled(out[:, 5:]).bool()  # not the pads after EOS
    # 1e-5: the teacher-forced forward's rounding against the decode loop's
    assert bool((chosen >= 0.5 * probs.max(-1).values - 1e-5)[sampled].all())


def _sampled(response):
    """1 at the tokens sampled (up to and including EOS: the model's eos 2 fills in for an
    eos_token_id=None, as in HF), 0 at the pads after it."""
    return response_mask_from(response, torch.tensor([2]))


SERVED_CASES = {  # call options, and the option a sampler blind to it would miss (None: none)
    "default-top_k": (dict(temperature=3.0), None),  # HF's default top_k=50
    "k20": (dict(temperature=0.7, top_k=20), None),
    "p0.8": (dict(temperature=2.0, top_k=0, top_p=0.8), None),
    # top-p of the top-k distribution renormalised (HF), not of the whole vocabulary
    "k20-p0.5": (dict(temperature=2.0, top_k=20, top_p=0.5), "top_k"),
    "min_p0.3": (dict(temperature=1.0, top_k=0, min_p=0.3), "min_p"),
    "k40-min_p0.3": (dict(temperature=1.0, top_k=40, min_p=0.3), "min_p"),
    "penalty0.3": (dict(temperature=0.5, top_k=0, repetition_penalty=0.3),
                   "repetition_penalty"),
    "suppress": (dict(temperature=0.7, top_k=0, suppress_tokens="likely"), "suppress_tokens"),
    # the most likely first token as EOS, which min_new_tokens=1 forbids
    "min_new": (dict(temperature=1.0, top_k=0, min_new_tokens=1, eos_token_id="likely"),
                "min_new_tokens"),
}
DRAWS = 8000


def _blind_probs(model, ids, mask, options, miss):
    """The first-token distribution of a sampler that ignores `miss`; for top_k: top-p of the
    whole vocabulary, then top-k (the fused sampler's own rule for the pair)."""
    if miss == "top_k":
        z = first_token_logits(model, ids, mask) / options["temperature"]
        on_full = tf.TopPLogitsWarper(options["top_p"])(None, z)
        return tf.TopKLogitsWarper(options["top_k"])(None, on_full)[0].softmax(-1)
    rest = {k: v for k, v in options.items() if k != miss}
    return hf_first_token_probs(model, ids, mask, **rest)[0]


def _repetitive_prompt(model, rng):
    """[1, 10] a left padded prompt ending in the model's own greedy continuation (which
    repeats itself: the tokens a repetition penalty changes are likely)."""
    ids, mask = left_padded_prompts([4, 2], rng)
    ids = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         pad_token_id=0, eos_token_id=None)[1:]
    return ids, torch.cat([mask[1:], torch.ones(1, 6, dtype=torch.long)], 1)


def _case(model, case, rng):
    """(prompt [1, P], its mask, options, HF's first-token distribution, tv_bound): for an
    option a blind sampler would miss, the first of ten random prompts on which it misses it by
    more than twice the bound (chosen before any fused draw: the bound's guarantee holds)."""
    for _ in range(10):
        ids, mask = _repetitive_prompt(model, rng)
        options = dict(SERVED_CASES[case][0], do_sample=True)
        likely = [k for k in ("suppress_tokens", "eos_token_id") if options.get(k) == "likely"]
        if likely:
            plain = hf_first_token_probs(model, ids, mask, **dict(options, **{likely[0]: None}))
            top = plain[0].argsort(descending=True)
            options[likely[0]] = top[:8].tolist() if likely[0] == "suppress_tokens" \
                else int(top[0])
        exact = hf_first_token_probs(model, ids, mask, **options)[0]
        bound, miss = tv_bound(exact, DRAWS), SERVED_CASES[case][1]
        if miss is None or total_variation(_blind_probs(model, ids, mask, options, miss),
                                           exact) > 2 * bound:
            return ids, mask, options, exact, bound
    pytest.fail(f"{case}: no prompt on which {miss} changes the distribution")


# each case through one of the two ways of giving options, in turn
@pytest.mark.parametrize("case,as_config", [(case, i % 2 == 1)
                                            for i, case in enumerate(SERVED_CASES)])
def test_served_sampling_matches_hf_distribution(case, as_config, rng, monkeypatch):
    """The first new token of one prompt drawn DRAWS times: its histogram is within tv_bound
    of HF's processed distribution (HF's own processor list; exceeded by chance with
    probability < 1e-6), and a sampler blind to the option would be off by twice that."""
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    ids, mask, options, exact, bound = _case(model, case, rng)
    apply_rlhf_kernels(model)
    used = spy_fused(monkeypatch)
    call = dict(max_new_tokens=1, pad_token_id=0, **options)
    args = dict(generation_config=tf.GenerationConfig(**call)) if as_config else call
    out = model.generate(input_ids=ids.expand(DRAWS, -1), attention_mask=mask.expand(DRAWS, -1),
                         **args)
    assert used, "a served call must take the fused path"
    counts = torch.bincount(out[:, -1], minlength=exact.numel()).float()
    assert counts[exact == 0].sum() == 0  # never outside HF's support
    assert total_variation(counts / counts.sum(), exact) < bound


def fused_calls_equal(model, ids, mask, calls, expected, as_config, monkeypatch):
    """Each call, patched, equals HF's `expected` output; returns the calls the fused loop got."""
    apply_rlhf_kernels(model)
    used = spy_fused(monkeypatch)
    for call, theirs in zip(calls, expected):
        args = dict(generation_config=tf.GenerationConfig(**call)) if as_config else call
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **args), theirs)
    return used


@pytest.mark.parametrize("as_config", [False, True], ids=["kwargs", "generation_config"])
def test_served_greedy_penalty_and_suppression_equal_hf(as_config, rng, monkeypatch):
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    base = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=5)
    for _ in range(10):  # prompts on which each option changes the greedy answer
        ids, mask = left_padded_prompts([4, 7, 2, 5], rng)
        ids = torch.where(mask == 0, torch.randint(3, 211, ids.shape, generator=rng), ids)
        plain = model.generate(input_ids=ids, attention_mask=mask, **base)
        often = torch.bincount(plain[:, 7:].flatten()).argmax().item()
        calls = [dict(base, repetition_penalty=1.6), dict(base, suppress_tokens=[often]),
                 dict(base, repetition_penalty=0.7, suppress_tokens=[often, 9])]
        expected = [model.generate(input_ids=ids, attention_mask=mask, **c) for c in calls]
        if all(not torch.equal(e, plain) for e in expected):
            break
    assert all(not torch.equal(e, plain) for e in expected)  # each option changes the answer
    used = fused_calls_equal(model, ids, mask, calls, expected, as_config, monkeypatch)
    assert len(used) == len(calls)


@pytest.mark.parametrize("as_config", [False, True], ids=["kwargs", "generation_config"])
def test_served_min_length_equals_hf(as_config, rng, monkeypatch):
    """min_new_tokens / min_length (which counts the padded prompt; min_new_tokens wins over
    it) keep EOS out until then, greedy and token for token as HF, on the fused path; a
    minimum past max_new_tokens means no EOS at all (HF only warns)."""
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    ids, mask = left_padded_prompts([4, 7, 2, 5], rng)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    eos = int(free[0, 8])  # the second token of row 0: without a minimum, row 0 ends there
    base = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos)
    plain = model.generate(input_ids=ids, attention_mask=mask, **base)
    calls = [dict(base, min_new_tokens=5), dict(base, min_length=7 + 4),
             dict(base, min_new_tokens=3, min_length=7 + 8), dict(base, min_new_tokens=12)]
    expected = [model.generate(input_ids=ids, attention_mask=mask, **c) for c in calls]
    assert all(not torch.equal(e, plain) for e in expected)  # each minimum changes the answer
    used = fused_calls_equal(model, ids, mask, calls, expected, as_config, monkeypatch)
    assert [u["min_new_tokens"] for u in used] == [5, 4, 3, 12]


def test_penalty_declined_where_hf_penalises_the_padding(rng, monkeypatch, caplog):
    """A transformers whose repetition penalty counts the left padding (older ones) is not the
    one the fused loop reproduces: the call goes to HF, said once."""
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    ids, mask = left_padded_prompts([4, 2], rng)
    assert integration._penalty_skips_left_padding(model)  # this transformers
    monkeypatch.setattr(integration, "_PROBE", {"skips": False})
    apply_rlhf_kernels(model)
    monkeypatch.setattr(integration, "generate", lambda *a, **k: pytest.fail("fused path used"))
    call = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, repetition_penalty=1.5)
    with caplog.at_level(logging.WARNING, logger="rlhf_kernels.integrations"):
        for _ in range(2):
            model.generate(input_ids=ids, attention_mask=mask, **call)
    said = [r.getMessage() for r in caplog.records if "falls back to HF" in r.getMessage()]
    assert len(said) == 1 and "left padding" in said[0], said


def test_integer_penalty_gets_hfs_own_error(rng, monkeypatch):
    """HF refuses repetition_penalty=2 (not a float): the call goes to HF, which says so."""
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    ids, mask = left_padded_prompts([4, 2], rng)
    apply_rlhf_kernels(model)
    monkeypatch.setattr(integration, "generate", lambda *a, **k: pytest.fail("fused path used"))
    with pytest.raises(ValueError, match="strictly positive float"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                       pad_token_id=0, repetition_penalty=2)


def test_plain_do_sample_keeps_to_default_top_k(rng, monkeypatch):
    """model.generate(do_sample=True) with nothing else: every sampled token is within the top
    50 of its logits (HF's default top_k), on the fused path."""
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    model.generation_config.temperature = 4.0  # flat enough that top-k=50 binds
    ids, mask = left_padded_prompts([5, 3, 6, 2] * 16, rng)
    apply_rlhf_kernels(model)
    used = spy_fused(monkeypatch)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=8,
                         pad_token_id=0, eos_token_id=None)
    assert used
    full = torch.cat([mask, torch.ones_like(out[:, 6:])], 1)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=full,  # positions as generate's
                       position_ids=position_ids_from_mask(full)).logits[:, 5:-1]
    chosen = logits.gather(-1, out[:, 6:, None])
    rank = (logits > chosen + 1e-4).sum(-1)
    assert int(rank[_sampled(out[:, 6:]).bool()].max()) < 50


def test_call_arguments_outside_the_config_go_to_hf(rng, monkeypatch):
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    ids, mask = left_padded_prompts([3, 4], rng)
    apply_rlhf_kernels(model)
    monkeypatch.setattr(integration, "generate", lambda *a, **k: pytest.fail("fused path used"))
    stop = tf.StoppingCriteriaList([tf.MaxLengthCriteria(max_length=6)])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         pad_token_id=0, stopping_criteria=stop)
    assert out.shape == (2, 6)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    assert len(out.scores) == 3
