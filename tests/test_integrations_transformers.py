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


def _lora(model):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(11)  # init_lora_weights=False: random B, so the adapter changes outputs
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))


@pytest.mark.parametrize("order", ["apply-then-wrap", "wrap-then-apply"])
def test_unmerged_lora_goes_to_hf_without_recursion(order, rng, monkeypatch, caplog):
    """The fallback calls HF's ORIGINAL generate: through `model.generate` (the wrapper) it
    recursed (RecursionError). Once the LoRA is merged, the fused loop serves the call."""
    pytest.importorskip("peft")
    import rlhf_kernels.integrations.transformers as integration
    monkeypatch.setattr(integration, "_said", set(), raising=False)
    ids, mask = left_padded_prompts([4, 7, 2], rng)
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                pad_token_id=0, eos_token_id=5)
    expected = _lora(build(CONFIGS["llama-gqa-tied"], seed=2)).generate(**call)
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    if order == "apply-then-wrap":
        peft_model = _lora(apply_rlhf_kernels(model))
    else:
        peft_model = apply_rlhf_kernels(_lora(model))
    used = []
    fused = integration.generate
    monkeypatch.setattr(integration, "generate", lambda *a, **k: used.append(1) or fused(*a, **k))
    with caplog.at_level(logging.WARNING, logger="rlhf_kernels.integrations"):
        first = peft_model.generate(**call)
        second = peft_model.generate(**call)
    assert torch.equal(first, expected) and torch.equal(second, expected) and not used
    said = [r.getMessage() for r in caplog.records if "falls back to HF" in r.getMessage()]
    assert len(said) == 1 and "LoRA" in said[0], said
    peft_model.merge_adapter()
    assert torch.equal(peft_model.generate(**call), expected) and used


@pytest.mark.parametrize("order", ["apply-then-wrap", "wrap-then-apply"])
def test_peft_prompt_tuning_goes_to_hf(order, rng, monkeypatch):
    """Prompt tuning's virtual tokens enter through peft's prepared inputs, not the weights:
    the fused loop would drop them, so the call goes to HF."""
    peft = pytest.importorskip("peft")
    import rlhf_kernels.integrations.transformers as integration

    def wrap(model):
        torch.manual_seed(11)
        return peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                  num_virtual_tokens=3))
    ids, mask = left_padded_prompts([4, 6], rng)
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                pad_token_id=0, eos_token_id=5)
    expected = wrap(build(CONFIGS["llama-gqa-tied"], seed=2)).generate(**call)
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    wrapped = wrap(apply_rlhf_kernels(model)) if order == "apply-then-wrap" \
        else apply_rlhf_kernels(wrap(model))
    monkeypatch.setattr(integration, "generate", lambda *a, **k: pytest.fail("fused path used"))
    assert torch.equal(wrapped.generate(**call), expected)
