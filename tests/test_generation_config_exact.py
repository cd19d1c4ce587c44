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


DECLINED_CASES = [
    dict(do_sample=True, min_p=0.5),
    dict(do_sample=True, top_k=0, repetition_penalty=1.5),
    dict(do_sample=False, suppress_tokens=[7, 9]),
    dict(do_sample=False, no_repeat_ngram_size=2),
    dict(do_sample=False, bad_words_ids=[[11]]),
    dict(do_sample=False, num_beams=2),
    dict(do_sample=True, typical_p=0.5),
    # the fused sampler's top-p counts the mass before top-k, HF's after: not the same set
    dict(do_sample=True, top_p=0.9),  # with HF's default top_k=50
    dict(do_sample=False, min_new_tokens=8, eos_token_id=5),
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


def test_min_p_and_suppress_tokens_are_honoured(rng):
    """The two reported cases: min_p=0.5 emitted tokens below min_p, suppress_tokens emitted
    the suppressed token."""
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    ids, mask = left_padded_prompts([5] * 64, rng)
    greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                            do_sample=False, pad_token_id=0, eos_token_id=None)
    banned = int(greedy[0, 5])
    apply_rlhf_kernels(model)
    config = tf.GenerationConfig(do_sample=False, suppress_tokens=[banned], max_new_tokens=6,
                                 pad_token_id=0)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert not bool((out[:, 5:] == banned).any())
    config = tf.GenerationConfig(do_sample=True, min_p=0.5, top_k=0, temperature=2.0,
                                 max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    full = torch.cat([mask, torch.ones_like(out[:, 5:])], 1)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=full).logits[:, 4:-1] / 2.0
    probs = logits.softmax(-1)
    chosen = probs.gather(-1, out[:, 5:, None])[..., 0]
    sampled = _sampled(out[:, 5:]).bool()  # not the pads after EOS
    assert bool((chosen >= 0.5 * probs.max(-1).values - 1e-5)[sampled].all())


def _sampled(response):
    """1 at the tokens sampled (up to and including EOS: the model's eos 2 fills in for an
    eos_token_id=None, as in HF), 0 at the pads after it."""
    return response_mask_from(response, torch.tensor([2]))


def _first_token_probs(model, ids, config):
    """The exact distribution of the first new token under HF's own warpers for `config`."""
    with torch.no_grad():
        logits = model(input_ids=ids[:1]).logits[:, -1]
    warpers = tf.LogitsProcessorList()
    if config["temperature"] != 1.0:
        warpers.append(tf.TemperatureLogitsWarper(config["temperature"]))
    if config["top_k"]:
        warpers.append(tf.TopKLogitsWarper(config["top_k"]))
    if config["top_p"] < 1.0:
        warpers.append(tf.TopPLogitsWarper(config["top_p"]))
    return warpers(ids[:1], logits).softmax(-1)[0]


SERVED_CASES = [
    dict(temperature=3.0, top_k=50, top_p=1.0, given={}),  # HF's default top_k=50
    dict(temperature=0.7, top_k=20, top_p=1.0, given=dict(top_k=20)),
    dict(temperature=2.0, top_k=0, top_p=0.8, given=dict(top_k=0, top_p=0.8)),
]


@pytest.mark.parametrize("as_config", [False, True], ids=["kwargs", "generation_config"])
@pytest.mark.parametrize("case", SERVED_CASES, ids=["default-top_k", "k20", "p0.8"])
def test_served_sampling_matches_hf_distribution(case, as_config, rng, monkeypatch):
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    prompt = torch.randint(3, 211, (1, 6), generator=rng)
    ids = prompt.expand(4000, -1).contiguous()
    exact = _first_token_probs(model, ids, case)
    apply_rlhf_kernels(model)
    used = []
    fused = integration.generate
    monkeypatch.setattr(integration, "generate", lambda *a, **k: used.append(1) or fused(*a, **k))
    call = dict(do_sample=True, temperature=case["temperature"], max_new_tokens=1,
                pad_token_id=0, **case["given"])
    args = dict(generation_config=tf.GenerationConfig(**call)) if as_config else call
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **args)
    assert used, "a served call must take the fused path"
    counts = torch.bincount(out[:, -1], minlength=exact.numel()).float()
    assert counts[exact == 0].sum() == 0  # never outside HF's top-k / top-p support
    total_variation = 0.5 * (counts / counts.sum() - exact).abs().sum()
    assert total_variation < 0.08, float(total_variation)


def test_plain_do_sample_keeps_to_default_top_k(rng, monkeypatch):
    """model.generate(do_sample=True) with nothing else: every sampled token is within the top
    50 of its logits (HF's default top_k), on the fused path."""
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    model.generation_config.temperature = 4.0  # flat enough that top-k=50 binds
    ids, mask = left_padded_prompts([5, 3, 6, 2] * 16, rng)
    apply_rlhf_kernels(model)
    used = []
    fused = integration.generate
    monkeypatch.setattr(integration, "generate", lambda *a, **k: used.append(1) or fused(*a, **k))
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
