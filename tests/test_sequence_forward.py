"""generation.sequence_forward (the trainer's whole-sequence forwards on the fused path, with
and without grad) against the Hugging Face forward, when it declines, and its use by the
trainer's forwards."""
import pytest
import torch

import rlhf.models.fused_forward as fused_forward
from rlhf.algorithms.model_forward import causal_lm_logits
from rlhf.models import ValueModel
from rlhf_kernels.generation import sequence_forward
from rlhf_kernels.generation import position_ids_from_mask

from tiny_models import CONFIGS, FALLBACK, build, left_padded_prompts

LLAMA_FAMILY = [name for name in CONFIGS if not name.startswith(("gpt2", "opt"))]
# fp32, the same math in another summation order (RMSNorm, projections): logits of size <= 10
# agree to ~1e-6 (observed <= 4e-6); 2e-5 leaves room without hiding a wrong mask (~1e-1)
ATOL = 2e-5


def sequences(rng):
    """Left-padded prompts followed by a response that ends early on one row (right pad)."""
    ids, mask = left_padded_prompts([5, 1, 9, 3], rng)
    mask = mask.clone()
    mask[0, -2:] = 0
    return ids, mask


def hf(model, ids, mask, **kwargs):
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                 use_cache=False, **kwargs)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_logits_equal_hf_on_padded_sequences(family, rng):
    model = build(CONFIGS[family], seed=int(torch.randint(1 << 30, (1,), generator=rng)))
    ids, mask = sequences(rng)
    with torch.no_grad():
        expected = hf(model, ids, mask).logits
        ours = sequence_forward(model, ids, mask)
        last3 = sequence_forward(model, ids, mask, last=3)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(last3, ours[:, -3:], atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama-gqa-tied", "gpt2", "opt"])
def test_padding_on_either_side_leaves_the_real_tokens_alone(family, rng):
    """position_ids_from_mask's contract: the real tokens of a row padded on the left and on
    the right get the positions, and so the logits, of the row alone (HF and ours)."""
    model = build(CONFIGS[family], seed=5)
    ids, mask = sequences(rng)
    real = mask[0].bool()  # row 0: 4 pads, 3 real tokens, 2 pads
    assert not real[0] and not real[-1]
    with torch.no_grad():
        alone = hf(model, ids[:1, real], mask[:1, real]).logits[0]
        padded_hf = hf(model, ids, mask).logits[0, real]
        padded_ours = sequence_forward(model, ids, mask)[0, real]
    torch.testing.assert_close(padded_hf, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(padded_ours, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", LLAMA_FAMILY)
def test_hidden_states_of_a_base_model_equal_hf(family, rng):
    model = build(CONFIGS[family], seed=3)
    ids, mask = sequences(rng)
    with torch.no_grad():
        expected = hf(model.base_model, ids, mask).last_hidden_state
        ours = sequence_forward(model.base_model, ids, mask, hidden=True)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=ATOL, rtol=0)


def test_declines_what_it_cannot_serve_exactly(rng):
    ids, mask = sequences(rng)
    llama = build(CONFIGS["llama-gqa-tied"], seed=1)
    assert sequence_forward(build(FALLBACK), ids, mask) is None            # no adapter
    assert sequence_forward(build(CONFIGS["gpt2"]).base_model, ids, mask, hidden=True) is None
    assert sequence_forward(llama.base_model, ids, mask) is None           # no LM head
    llama.train()
    assert sequence_forward(llama, ids, mask) is not None                  # no dropout: fine
    llama.config.attention_dropout = 0.1
    assert sequence_forward(llama, ids, mask) is None                      # dropout in training
    llama.eval()
    assert sequence_forward(llama, ids, mask) is not None
    for param in llama.parameters():                                       # ZeRO-3 partitioned
        param.ds_id = 0
    assert sequence_forward(llama, ids, mask) is None


def test_lora_not_merged_is_declined(rng):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build(CONFIGS["llama-gqa-tied"], seed=1),
                                peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ids, mask = sequences(rng)
    assert sequence_forward(model, ids, mask) is None


def loss_and_grads(model, logits, mask, weights):
    """A loss over the real positions only (as the PPO losses mask them) and its gradients."""
    model.zero_grad(set_to_none=True)
    (logits.float() * weights)[mask.bool()].sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_gradients_equal_hf(family, rng):
    """With grad on, the path runs differentiable ops (our RMSNorm kernels' backward in fp32 on
    the CPU): the same parameter gradients as the HF forward's. fp32 in another summation order
    through two layers: observed gaps <= 4e-6 of a tensor's largest gradient (0 for GPT-2 /
    OPT, which have no RMSNorm); the tolerance is 2e-5 of it, where a wrong mask or a missing
    term is off by O(1)."""
    model = build(CONFIGS[family], seed=int(torch.randint(1 << 30, (1,), generator=rng)))
    ids, mask = sequences(rng)
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=rng)
    expected = loss_and_grads(model, hf(model, ids, mask).logits, mask, weights)
    ours = loss_and_grads(model, sequence_forward(model, ids, mask), mask, weights)
    assert ours.keys() == expected.keys() and len(ours) == len(list(model.parameters()))
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(ours[name], grad, atol=2e-5 * scale, rtol=0, msg=name)


def test_training_mode_without_dropout_and_checkpointing(rng):
    model = build(CONFIGS["llama-gqa-tied"], seed=4).train()
    ids, mask = sequences(rng)
    logits = sequence_forward(model, ids, mask)
    assert logits is not None and logits.requires_grad
    model.gradient_checkpointing_enable()
    assert sequence_forward(model, ids, mask) is None        # HF recomputes; ours would not
    with torch.no_grad():
        assert sequence_forward(model, ids, mask) is not None  # no grad: nothing to recompute


def test_trainer_forwards_take_the_fused_path_with_and_without_grad(rng, monkeypatch):
    model = build(CONFIGS["llama-gqa-tied"], seed=2)
    value = ValueModel.from_causal_lm(build(CONFIGS["qwen2-bias"], seed=2))
    ids, mask = sequences(rng)
    calls = []
    original = fused_forward.sequence_forward
    monkeypatch.setattr(fused_forward, "sequence_forward",
                        lambda *a, **k: calls.append(k.get("hidden", False)) or original(*a, **k))
    with torch.no_grad():
        fused = causal_lm_logits(model, ids, mask, keep_last=4), value(ids, mask)
        monkeypatch.setattr(fused_forward, "ENABLED", False)
        plain = causal_lm_logits(model, ids, mask, keep_last=4), value(ids, mask)
        monkeypatch.setattr(fused_forward, "ENABLED", True)
    assert calls == [False, True]
    real = mask.bool()  # padding positions differ (ours attend to themselves) and are unused
    torch.testing.assert_close(fused[0][real[:, -4:]], plain[0][real[:, -4:]], atol=ATOL, rtol=0)
    torch.testing.assert_close(fused[1][real], plain[1][real], atol=ATOL, rtol=0)
    training = causal_lm_logits(model, ids, mask, keep_last=4), value(ids, mask)
    assert calls == [False, True, False, True]
    assert all(out.requires_grad for out in training)
    assert "forward" not in vars(model)  # the instance forward is swapped for the call only


def test_routed_forward_falls_back_to_hf_for_other_calls(rng):
    model = build(CONFIGS["llama-gqa-tied"], seed=5)
    ids, mask = sequences(rng)
    with torch.no_grad(), fused_forward.routed(model):
        labels = model(input_ids=ids, attention_mask=mask, labels=ids)     # a kwarg it lacks
        cached = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert labels.loss is not None and cached.past_key_values is not None
    with pytest.raises(RuntimeError, match="boom"), fused_forward.routed(model):
        raise RuntimeError("boom")
    assert "forward" not in vars(model)


def test_routed_through_unmerged_lora_runs_hf(rng):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build(CONFIGS["llama-gqa-tied"], seed=1),
                                peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ids, mask = sequences(rng)
    with torch.no_grad():
        routed = causal_lm_logits(model, ids, mask)
        expected = hf(model, ids, mask).logits
    torch.testing.assert_close(routed, expected, atol=0, rtol=0)
