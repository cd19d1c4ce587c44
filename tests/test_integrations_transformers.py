"""apply_rlhf_kernels: HF `generate` calls served by the fused loop give HF's own outputs."""
import logging

import pytest
import torch

from rlhf_kernels.integrations.transformers import apply_rlhf_kernels, remove_rlhf_kernels

from tiny_models import CONFIGS, FALLBACK, build, left_padded_prompts


@pytest.mark.parametrize("family", ["llama-gqa-tied", "gpt2", "opt"])
def test_greedy_generate_is_served_and_equal(family, rng):
    model = build(CONFIGS[family], seed=2)
    ids, mask = left_padded_prompts([4, 7, 2], rng)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9,
                              do_sample=False, pad_token_id=0, eos_token_id=5)
    calls = []
    apply_rlhf_kernels(model)
    served = model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return served(*args, **kwargs)
    model.generate = spy
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                         pad_token_id=0, eos_token_id=5)
    assert torch.equal(got, expected) and calls
    model.generate = served
    remove_rlhf_kernels(model)
    assert "generate" not in model.__dict__


def test_unserved_options_go_to_hf(rng, monkeypatch):
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    ids, mask = left_padded_prompts([3, 3], rng)
    apply_rlhf_kernels(model)
    import rlhf_kernels.integrations.transformers as integration
    monkeypatch.setattr(integration, "generate", lambda *a, **k: pytest.fail("fused path used"))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)


def test_family_without_adapter_is_left_alone(caplog):
    model = build(FALLBACK, seed=1)
    with caplog.at_level(logging.WARNING, logger="rlhf_kernels.integrations"):
        apply_rlhf_kernels(model)
    assert "generate" not in model.__dict__ and "gpt_neox" in caplog.text
