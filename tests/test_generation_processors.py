"""generation.generate with repetition_penalty, suppress_tokens, min_p and top-k-then-top-p:
the processed logits equal HF's own processors' bit for bit, greedy equals HF token for token,
sampled tokens never leave HF's support, log-probs stay the model's own; min_p with top_p < 1
takes the HF path."""
import logging

import pytest
import torch
import transformers as tf

from rlhf_kernels.generation import generate, loop, processors
from rlhf_kernels.generation.fallback import response_logprobs

from hf_processing import hf_processors
from tiny_models import CONFIGS, FALLBACK, build, left_padded_prompts

LENGTHS = [5, 1, 9, 3]


def padded_prompts(rng, lengths=LENGTHS):
    """Left padded prompts whose padding holds ordinary token ids (not the pad id): they must
    not count for the repetition penalty (HF leaves the left padding out)."""
    ids, mask = left_padded_prompts(lengths, rng)
    fill = torch.randint(3, 211, ids.shape, generator=rng)
    ids = torch.where(mask == 0, fill, ids)
    outside = [set(ids[r][mask[r] == 0].tolist()) - set(ids[r][mask[r] == 1].tolist())
               for r in range(len(lengths))]
    assert any(outside)  # some padding token a penalty on the padding would change
    return ids, mask


def hf_options(temperature, top_k=0, top_p=1.0, min_p=0.0, **rest):
    """The HF generate options of a generate() call."""
    if temperature == 0:
        return dict(do_sample=False, **rest)
    return dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                min_p=min_p or None, **rest)


def record(monkeypatch, cls, name):
    """Calls of cls.name as (args, result), cloned."""
    calls, original = [], getattr(cls, name)

    def spy(self, *args):
        out = original(self, *args)
        calls.append(([a.clone() if isinstance(a, torch.Tensor) else a for a in args], out))
        return out
    monkeypatch.setattr(cls, name, spy)
    return calls


def case_id(case):
    return "-".join(f"{k}{len(v) if isinstance(v, list) else v}" for k, v in case.items())


PROCESSED_CASES = [
    dict(temperature=0, repetition_penalty=1.7),
    dict(temperature=0, suppress_tokens=[3, 17, 150, 400]),  # 400: past the vocabulary
    dict(temperature=1.3, repetition_penalty=0.6, top_k=50),
    dict(temperature=0.8, min_p=0.1),
    dict(temperature=1.5, repetition_penalty=1.3, suppress_tokens=[5, 9], top_k=20, min_p=0.05),
    # EOS ids at -inf for the first steps (ids past the vocabulary change nothing)
    dict(temperature=0, min_new_tokens=6, eos_token_id=[5, 9, 400]),
    dict(temperature=1.1, repetition_penalty=1.2, min_new_tokens=4, eos_token_id=[7], top_k=30),
]


@pytest.mark.parametrize("case", PROCESSED_CASES, ids=case_id)
def test_processed_logits_equal_hf_bitwise(case, rng, monkeypatch):
    """Each step's processed logits / T equal what HF's processor list gives for the same
    logits and prefix (tokens and -inf alike): the same arithmetic in the same order."""
    model = build(CONFIGS["llama-gqa-tied"], seed=3)
    ids, mask = padded_prompts(rng)
    calls = record(monkeypatch, processors.LogitsProcessors, "__call__")
    out = generate(model, ids, mask, max_new_tokens=10, pad_token_id=0, generator=rng,
                   **dict(dict(eos_token_id=[]), **case))
    assert out.path == "fused:llama" and len(calls) == out.sequences.shape[1] - ids.shape[1]
    temperature = case["temperature"] or 1.0
    # top-k alone is left to the sampler, whose kept set is HF's TopKLogitsWarper's
    sampler_top_k = tf.TopKLogitsWarper(case["top_k"]) \
        if case.get("top_k") and not case.get("min_p") else None
    for step, ((logits, rows), ours) in enumerate(calls):
        prefix = out.sequences[rows, :ids.shape[1] + step]
        theirs = hf_processors(model, ids[rows], mask[rows], **hf_options(**case))(prefix, logits)
        ours = ours / temperature
        ours = sampler_top_k(prefix, ours) if sampler_top_k else ours
        assert torch.equal(ours, theirs), step


SUPPORT_CASES = [
    dict(temperature=1.5, top_k=0, min_p=0.3),
    dict(temperature=2.0, top_k=30, top_p=0.7),  # top-p of the top-k distribution
    dict(temperature=1.2, suppress_tokens=list(range(3, 60))),
    dict(temperature=1.5, top_k=40, min_p=0.2, repetition_penalty=1.4),
]


@pytest.mark.parametrize("case", SUPPORT_CASES, ids=case_id)
def test_sampled_tokens_stay_in_hf_support(case, rng, monkeypatch):
    """No sampled token has probability 0 under HF's processed distribution of its step (0
    violations), while a sampler blind to the option would have drawn >= 20 such tokens on
    average (so the chance that it passes is < e^-20)."""
    model = build(CONFIGS["llama-gqa-tied"], seed=3)
    ids, mask = padded_prompts(rng, [4, 7, 2, 6] * 16)
    calls = record(monkeypatch, loop._Decoder, "choose")
    out = generate(model, ids, mask, max_new_tokens=8, eos_token_id=[], pad_token_id=0,
                   generator=rng, **case)
    assert out.path == "fused:llama"
    violations, blind_expected = 0, 0.0
    for step, ((logits, _, _, rows), (tokens, _)) in enumerate(calls):
        prefix = out.sequences[rows, :ids.shape[1] + step]
        probs = hf_processors(model, ids[rows], mask[rows], **hf_options(**case))(
            prefix, logits.float()).softmax(-1)
        violations += int((probs.gather(-1, tokens[:, None]) == 0).sum())
        plain = (logits.float() / case["temperature"]).softmax(-1)
        blind_expected += float(plain[probs == 0].sum())
    assert violations == 0
    assert blind_expected >= 20, blind_expected


@pytest.mark.parametrize("family", ["llama-gqa-tied", "gpt2"])
def test_greedy_with_processors_equals_hf_token_for_token(family, rng):
    model = build(CONFIGS[family], seed=4)
    ids, mask = padded_prompts(rng)
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                pad_token_id=0, eos_token_id=None)
    plain = model.generate(**call)
    often = torch.bincount(plain[:, ids.shape[1]:].flatten()).argsort(descending=True)[:3]
    for options in (dict(repetition_penalty=1.6), dict(repetition_penalty=0.7),
                    dict(suppress_tokens=often.tolist()),
                    dict(repetition_penalty=2.0, suppress_tokens=often[:1].tolist())):
        theirs = model.generate(**call, **options)
        assert not torch.equal(theirs, plain), options  # the option changes the answer
        ours = generate(model, ids, mask, max_new_tokens=12, temperature=0, eos_token_id=[],
                        pad_token_id=0, **options)
        assert ours.path.startswith("fused:") and torch.equal(ours.sequences, theirs), options


@pytest.mark.parametrize("case", [dict(temperature=0, repetition_penalty=1.5,
                                       suppress_tokens=[7]),
                                  dict(temperature=1.3, top_k=20, top_p=0.8, min_p=0.0,
                                       repetition_penalty=1.2),
                                  dict(temperature=0.9, min_p=0.2, suppress_tokens=[4, 5])])
def test_behaviour_logprobs_are_the_models_own(case, rng):
    """The processors change what is sampled, not the log-probs: log_softmax(logits / T) of
    the unprocessed logits, what training recomputes (a teacher-forced forward)."""
    model = build(CONFIGS["llama-gqa-tied"], seed=3)
    ids, mask = padded_prompts(rng)
    out = generate(model, ids, mask, max_new_tokens=10, eos_token_id=2, pad_token_id=0,
                   generator=rng, **case)
    full = torch.cat([mask, out.response_mask], 1)
    expected = response_logprobs(model, out.sequences, full, ids.shape[1], case["temperature"])
    # fp32 in two summation orders: 1e-4 is ~100x their observed gap
    torch.testing.assert_close(out.logprobs, expected.float() * out.response_mask, atol=1e-4,
                               rtol=0)


def test_min_p_with_top_p_takes_hf_path_said_once(rng, caplog, monkeypatch):
    monkeypatch.setattr("rlhf_kernels.generation.fallback._said", set())
    model = build(CONFIGS["llama-gqa-tied"], seed=3)
    ids, mask = left_padded_prompts(LENGTHS, rng)
    call = dict(max_new_tokens=6, temperature=1.2, top_k=0, top_p=0.8, min_p=0.1,
                eos_token_id=[], pad_token_id=0)
    with caplog.at_level(logging.WARNING, logger="rlhf_kernels.generation"):
        torch.manual_seed(3)
        ours = generate(model, ids, mask, **call)
        generate(model, ids, mask, **call)
    assert ours.path.startswith("fallback: min_p=0.1 with top_p=0.8")
    said = [r.getMessage() for r in caplog.records if "min_p" in r.getMessage()]
    assert len(said) == 1, said
    torch.manual_seed(3)
    # eos_token_id=None: no EOS, as eos_token_id=[] above (the model's eos 2 would end a row)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                            pad_token_id=0, eos_token_id=None, **hf_options(1.2, 0, 0.8, 0.1))
    assert torch.equal(ours.sequences, theirs)


def test_fallback_model_gets_the_options_and_no_others(rng):
    """A model without adapter: the options reach HF's generate, and the neutral ones are
    given too, so the model's generation_config cannot add a penalty the call did not ask."""
    model = build(FALLBACK, seed=8)
    ids, mask = left_padded_prompts(LENGTHS, rng)
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                pad_token_id=0, eos_token_id=None)
    theirs = model.generate(**call, repetition_penalty=1.8, suppress_tokens=[5])
    ours = generate(model, ids, mask, max_new_tokens=8, temperature=0, eos_token_id=[],
                    pad_token_id=0, repetition_penalty=1.8, suppress_tokens=[5])
    assert ours.path.startswith("fallback") and torch.equal(ours.sequences, theirs)
    plain = model.generate(**call)
    model.generation_config.repetition_penalty = 3.0
    ours = generate(model, ids, mask, max_new_tokens=8, temperature=0, eos_token_id=[],
                    pad_token_id=0)
    assert torch.equal(ours.sequences, plain)
    assert not torch.equal(model.generate(**call), plain)  # the config's penalty would show


@pytest.mark.parametrize("options,error,match", [
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), ValueError, "repetition_penalty"),
    (dict(repetition_penalty="1.2"), TypeError, "repetition_penalty"),
    (dict(min_p=1.5), ValueError, "min_p"),
    (dict(min_p=-0.1), ValueError, "min_p"),
    (dict(suppress_tokens=[-1]), ValueError, "suppress_tokens"),
    (dict(suppress_tokens=[1.5]), ValueError, "suppress_tokens"),
    (dict(suppress_tokens=3), TypeError, "suppress_tokens"),
    (dict(min_new_tokens=-1), ValueError, "min_new_tokens"),
    (dict(min_new_tokens=2.0), ValueError, "min_new_tokens"),
])
def test_bad_processor_options(options, error, match, rng):
    model = build(CONFIGS["gpt2"], seed=1)
    ids, mask = left_padded_prompts(LENGTHS, rng)
    with pytest.raises(error, match=match):
        generate(model, ids, mask, max_new_tokens=4, **options)
