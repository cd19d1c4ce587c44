"""apply_rlhf_training_kernels: our layer kernels inside HF's own forwards (RMSNorm, SiLU-gated
MLP, RoPE), against the unpatched HF model: loss, logits and every parameter gradient, with
and without gradient checkpointing, per family; what it declines, and that it is removable."""
import copy
import gc
import logging
import sys

import pytest
import torch

import rlhf_kernels.integrations.training_forward as training_forward
from rlhf_kernels.generation import SUPPORTED_MODEL_TYPES
from rlhf_kernels.integrations.transformers import (apply_rlhf_training_kernels,
                                                    remove_rlhf_training_kernels)

from tiny_models import CONFIGS, build, left_padded_prompts

SERVED_FAMILIES = [name for name in CONFIGS if not name.startswith(("gpt2", "opt"))]
# fp32, the same math with other summation orders (the kernels' RMSNorm reductions) through
# two layers: observed <= 1 ulp on the loss and <= 2.4e-6 of a tensor's largest gradient
# entry. 1e-5 relative on the loss and 2e-5 of the largest entry on gradients and logits stay
# far below what a wrong formula gives (a missing eps, a sign of the rotation, GELU for SiLU:
# > 1e-2).
LOSS_RTOL, GRAD_RTOL, LOGITS_ATOL = 1e-5, 2e-5, 2e-5


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test sees its own "said once" log lines and runs the once-per-class checks."""
    monkeypatch.setattr(training_forward, "_said", set())
    monkeypatch.setattr(training_forward, "_probed", {})


def batch(rng, vocab):
    """Left-padded prompts (a row of one token) and a right-padded end; labels with holes."""
    ids, mask = left_padded_prompts([5, 1, 9, 3], rng, vocab=vocab)
    mask[0, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, -3] = -100
    return ids, mask, labels


def loss_logits_grads(model, ids, mask, labels, weights, autocast=False):
    """CE over the labels plus a random weighting of the real positions' logits (so that
    every logit carries gradient); the loss, the logits and every gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    loss = out.loss + (out.logits.float() * weights)[mask.bool()].sum() * 1e-3
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), out.logits.detach(), grads


def assert_same(got, want, mask, exact=False):
    (loss, logits, grads), (loss0, logits0, grads0) = got, want
    real = mask.bool()
    loose = 0.0 if exact else 1.0
    torch.testing.assert_close(loss, loss0, rtol=loose * LOSS_RTOL, atol=0)
    torch.testing.assert_close(logits[real], logits0[real], atol=loose * LOGITS_ATOL, rtol=0)
    assert grads.keys() == grads0.keys()
    for name, grad in grads0.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, atol=loose * GRAD_RTOL * scale, rtol=0,
                                   msg=name)


def counting(monkeypatch):
    """Counts the calls of each op from the served forwards."""
    calls = {"rms_norm": 0, "swiglu": 0, "rotate": 0}
    for name in calls:
        op = getattr(training_forward, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(training_forward, name, counted)
    return calls


def test_every_supported_family_is_classified():
    assert set(SUPPORTED_MODEL_TYPES) == set(training_forward.LAYER_FAMILIES) \
        | set(training_forward.NO_LAYER_OPS)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", SERVED_FAMILIES)
def test_loss_logits_and_gradients_equal_hf(family, checkpointing, rng, monkeypatch):
    model = build(CONFIGS[family], seed=int(torch.randint(1 << 30, (1,), generator=rng))).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    ids, mask, labels = batch(rng, model.config.vocab_size)
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=rng)
    want = loss_logits_grads(model, ids, mask, labels, weights)
    apply_rlhf_training_kernels(model)
    calls = counting(monkeypatch)  # after apply: its once-per-class check runs the ops too
    got = loss_logits_grads(model, ids, mask, labels, weights)
    assert_same(got, want, mask)
    layers = model.config.num_hidden_layers
    norms = layers * (4 if family.startswith("qwen3") else 2)  # + q / k norms
    runs = 2 if checkpointing else 1  # the backward recomputes each layer through our ops
    assert calls == {"rms_norm": runs * norms + 1, "swiglu": runs * layers,
                     "rotate": runs * layers * 2}


def test_other_dtypes_run_the_reference_equal_to_hf(rng):
    """bf16: the ops' torch reference runs HF's ops in HF's order: the same bits."""
    model = build(CONFIGS["qwen3-qk-norm"], seed=3, dtype=torch.bfloat16).train()
    model.activation_checkpointing_enable()
    ids, mask, labels = batch(rng, model.config.vocab_size)
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=rng)
    want = loss_logits_grads(model, ids, mask, labels, weights)
    got = loss_logits_grads(apply_rlhf_training_kernels(model), ids, mask, labels, weights)
    assert_same(got, want, mask, exact=True)


def test_autocast_keeps_hf_norms_and_is_logged(rng, caplog):
    model = build(CONFIGS["llama-gqa-tied"], seed=3).train()
    ids, mask, labels = batch(rng, model.config.vocab_size)
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=rng)
    want = loss_logits_grads(model, ids, mask, labels, weights, autocast=True)
    with caplog.at_level(logging.WARNING, "rlhf_kernels.integrations"):
        got = loss_logits_grads(apply_rlhf_training_kernels(model), ids, mask, labels, weights,
                                autocast=True)
    assert_same(got, want, mask)
    assert sum("autocast is on" in r.message for r in caplog.records) == 1


def test_lora_model_with_checkpointing(rng):
    peft = pytest.importorskip("peft")
    base = build(CONFIGS["llama-gqa-tied"], seed=4)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
        init_lora_weights=False, lora_dropout=0.1)).train()
    model.activation_checkpointing_enable()
    model.enable_input_require_grads()
    ids, mask, labels = batch(rng, base.config.vocab_size)
    weights = torch.randn(*ids.shape, base.config.vocab_size, generator=rng)
    torch.manual_seed(0)  # LoRA dropout: the same draws in both runs
    want = loss_logits_grads(model, ids, mask, labels, weights)
    apply_rlhf_training_kernels(model)  # its check against HF runs without dropout
    assert "forward" in vars(base.model.layers[0].mlp)
    torch.manual_seed(0)
    got = loss_logits_grads(model, ids, mask, labels, weights)
    assert want[2] and all("lora_" in name for name in want[2])
    assert_same(got, want, mask)


def test_hf_generate_through_served_modules_is_unchanged(rng):
    """HF's own decode loop (its KV cache written from our RoPE's [B, heads, T, D] views)."""
    model = build(CONFIGS["qwen3-qk-norm"], seed=8)
    ids, mask = left_padded_prompts([4, 7, 2], rng)
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    want = model.generate(ids, **options)
    got = apply_rlhf_training_kernels(model).generate(ids, **options)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_remove_restores_hf_and_the_module_function():
    """The module function goes back once no patched model of the family is left (the
    other tests' patched models collected)."""
    gc.collect()
    model = build(CONFIGS["mistral-sliding-window"], seed=5)
    modeling = sys.modules[type(model).__module__]
    hf_rope = training_forward._hf_rope_function(modeling)
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        apply_rlhf_training_kernels(model)
        assert modeling.apply_rotary_pos_emb is not hf_rope
        assert remove_rlhf_training_kernels(model) is model
        after = model(input_ids=ids).logits
    assert not any("forward" in vars(m) for m in model.modules())
    assert modeling.apply_rotary_pos_emb is hf_rope
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_a_deep_copy_runs_its_own_weights(rng):
    model = apply_rlhf_training_kernels(build(CONFIGS["llama-gqa-tied"], seed=6))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    plain_twin = remove_rlhf_training_kernels(copy.deepcopy(twin))
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=rng)
    with torch.no_grad():
        got, want = twin(input_ids=ids).logits, plain_twin(input_ids=ids).logits
        assert not torch.allclose(got, model(input_ids=ids).logits)
    torch.testing.assert_close(got, want, atol=LOGITS_ATOL * want.abs().max().item(), rtol=0)


def served(model):
    return {type(m).__name__ for m in model.modules() if "forward" in vars(m)}


def test_declined_modules_keep_hf_and_are_logged_once(caplog):
    config_cls, model_cls, kwargs = CONFIGS["llama-gqa-tied"]
    spec = (config_cls, model_cls, dict(kwargs, hidden_act="gelu"))
    gelu = build(spec, seed=7)
    with caplog.at_level(logging.WARNING, "rlhf_kernels.integrations"):
        apply_rlhf_training_kernels(gelu)
        apply_rlhf_training_kernels(build(spec))  # the same reason again: not said again
    # the tied input embedding too (tests/test_tied_embedding.py); the base model and the
    # attention's projections for shared prefixes (tests/test_prefix_sharing.py)
    assert served(gelu) == {"LlamaRMSNorm", "LlamaAttention", "Embedding", "LlamaModel",
                            "Linear"}
    said = [r.message for r in caplog.records]
    assert sum("LlamaMLP keeps HF's forward: its activation GELUActivation" in m
               for m in said) == 1, said


def test_unknown_families_and_partitioned_weights_are_left_alone(caplog):
    gpt2 = build(CONFIGS["gpt2"])
    zero3 = build(CONFIGS["qwen2-bias"])
    for p in zero3.parameters():
        p.ds_id = 0
    with caplog.at_level(logging.WARNING, "rlhf_kernels.integrations"):
        apply_rlhf_training_kernels(gpt2)
        apply_rlhf_training_kernels(zero3)
    assert not served(gpt2) and not served(zero3)
    said = " ".join(r.message for r in caplog.records)
    assert "model_type 'gpt2'" in said and "ZeRO-3" in said


def test_a_replaced_rope_function_or_forward_is_declined(caplog, monkeypatch):
    model = build(CONFIGS["qwen2-bias"])
    modeling = sys.modules[type(model).__module__]
    other = modeling.apply_rotary_pos_emb
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", lambda *a, **k: other(*a, **k))
    norm = model.model.norm
    norm.forward = lambda x: x  # someone else's forward on this instance
    with caplog.at_level(logging.WARNING, "rlhf_kernels.integrations"):
        apply_rlhf_training_kernels(model)
    # not model.norm, nor the attention or its projections
    assert served(model) == {"Qwen2RMSNorm", "Qwen2MLP", "Embedding", "Qwen2Model"}
    assert vars(norm)["forward"](3) == 3
    said = " ".join(r.message for r in caplog.records)
    assert "apply_rotary_pos_emb is not HF's" in said and "replaced already" in said
