"""Shared prefixes computed once (rlhf_kernels/integrations/prefix_sharing.py): the plan
against a brute-force one, the packing's gradients, and served models on GRPO-shaped batches
(each prompt repeated, then distinct completions) equal to HF in loss, logits and every
gradient, with and without gradient checkpointing; what runs unpacked, and that hooks and
dropout see what HF shows them."""
import logging

import pytest
import torch

import rlhf_kernels.integrations.prefix_sharing as prefix_sharing
import rlhf_kernels.integrations.training_forward as training_forward
from rlhf_kernels.integrations.prefix_sharing import build_plan
from rlhf_kernels.integrations.transformers import apply_rlhf_training_kernels

from test_training_forward import SERVED_FAMILIES, assert_same, loss_logits_grads
from tiny_models import CONFIGS, build, left_padded_prompts


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(training_forward, "_said", set())
    monkeypatch.setattr(training_forward, "_probed", {})
    monkeypatch.setattr(prefix_sharing, "_said", set())


def group_batch(rng, vocab, prompt_lengths=(5, 3), copies=3, completion=4):
    """Left-padded prompts, each repeated `copies` times, then random completions (one row
    ending early); labels on the completions."""
    prompts, prompt_mask = left_padded_prompts(list(prompt_lengths), rng, vocab=vocab)
    rows = len(prompt_lengths) * copies
    ids = torch.cat([prompts.repeat_interleave(copies, 0),
                     torch.randint(3, vocab, (rows, completion), generator=rng)], 1)
    mask = torch.cat([prompt_mask.repeat_interleave(copies, 0),
                      torch.ones(rows, completion, dtype=torch.long)], 1)
    mask[1, -1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompts.shape[1]] = -100
    return ids, mask, labels


def brute_force_first(ids, mask=None, positions=None):
    """[B, T]: the first row whose ids, mask and positions equal this row's through t."""
    rows, length = ids.shape
    keys = [k.expand(rows, length) for k in (ids, mask, positions) if k is not None]
    first = torch.empty(rows, length, dtype=torch.long)
    for b in range(rows):
        for t in range(length):
            first[b, t] = next(c for c in range(rows)
                               if all(torch.equal(k[c, :t + 1], k[b, :t + 1]) for k in keys))
    return first


def packing_counter(monkeypatch):
    calls = []
    original = prefix_sharing.PrefixPlan.pack

    def pack(self, x):
        calls.append(tuple(x.shape))
        return original(self, x)
    monkeypatch.setattr(prefix_sharing.PrefixPlan, "pack", pack)
    return calls


# -- the plan --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["groups", "partial", "mask-differs", "positions", "length-1"])
def test_plan_equals_brute_force(case, rng):
    ids, mask, _ = group_batch(rng, 50)
    positions = None
    if case == "partial":  # rows that agree for a while, then part
        ids[4, 6:], ids[5, 7:] = ids[3, 6:], ids[3, 7:]
    if case == "mask-differs":  # the same ids; a pad position is a real token in one copy
        mask[1, 0], ids[1, 0] = 1, ids[0, 0]
    if case == "positions":
        positions = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)
        positions[2] += 1
    if case == "length-1":
        ids, mask = ids[:, :1], mask[:, :1]
    plan = build_plan(ids, mask, positions)
    first = brute_force_first(ids, mask, positions)
    flat_first = (first * ids.shape[1] + torch.arange(ids.shape[1])).flatten()
    computed = (first == torch.arange(ids.shape[0])[:, None]).flatten()
    assert plan is not None
    assert torch.equal(plan.pack_index, computed.nonzero().squeeze(1))
    # every token reads its first copy's packed row
    assert torch.equal(plan.pack_index[plan.unpack_index], flat_first)
    assert plan.tokens == int(computed.sum())


def test_no_plan_when_too_little_repeats(rng):
    ids = torch.randint(3, 50, (4, 9), generator=rng)
    assert build_plan(ids) is None
    ids[1, :1] = ids[0, :1]  # 1 of 36 tokens repeated: below MIN_SHARED
    assert build_plan(ids) is None


@pytest.mark.parametrize("trailing", [(), (3,), (2, 5)])
def test_pack_and_unpack_gradients(trailing, rng):
    """gradcheck in float64, and the values against plain indexing."""
    ids, mask, _ = group_batch(rng, 50)
    ids[4, 6:] = ids[3, 6:]
    plan = build_plan(ids, mask)
    rows, length = ids.shape
    x = torch.randn(rows, length, *trailing, dtype=torch.float64, generator=rng,
                    requires_grad=True)
    y = torch.randn(plan.tokens, *trailing, dtype=torch.float64, generator=rng,
                    requires_grad=True)
    flat = x.reshape(rows * length, *trailing)
    assert torch.equal(plan.pack(x), flat[plan.pack_index])
    assert torch.equal(plan.unpack(y).reshape(rows * length, *trailing), y[plan.unpack_index])
    assert torch.autograd.gradcheck(plan.pack, (x,))
    assert torch.autograd.gradcheck(plan.unpack, (y,))
    # the repeated tokens' copies sum into their first copy's gradient
    grad, = torch.autograd.grad(plan.unpack(y).sum(), y)
    assert torch.equal(grad, torch.bincount(plan.unpack_index, minlength=plan.tokens)
                       .to(grad.dtype).reshape(-1, *[1] * len(trailing)).expand_as(grad))


# -- served models against HF ----------------------------------------------------------------

@pytest.mark.parametrize("checkpointing", ["none", "non-reentrant", "reentrant"])
@pytest.mark.parametrize("family", SERVED_FAMILIES)
def test_group_batch_equals_hf(family, checkpointing, rng, monkeypatch):
    model = build(CONFIGS[family], seed=int(torch.randint(1 << 30, (1,), generator=rng))).train()
    if checkpointing != "none":
        model.gradient_checkpointing_enable(
            {"use_reentrant": checkpointing == "reentrant"})
    ids, mask, labels = group_batch(rng, model.config.vocab_size)
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=rng)
    want = loss_logits_grads(model, ids, mask, labels, weights)
    apply_rlhf_training_kernels(model)
    packed = packing_counter(monkeypatch)
    got = loss_logits_grads(model, ids, mask, labels, weights)
    assert_same(got, want, mask)
    runs = 1 if checkpointing == "none" else 2  # the recompute packs too
    # per layer: the q / k / v input once, the o input, the MLP input
    assert len(packed) == runs * 3 * model.config.num_hidden_layers
    assert all(shape[:2] == tuple(ids.shape) for shape in packed)


def lora_model(dropout):
    peft = pytest.importorskip("peft")
    base = build(CONFIGS["llama-gqa-tied"], seed=4)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], init_lora_weights=False,
        lora_dropout=dropout)).train()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.enable_input_require_grads()
    return base, model


def test_lora_with_dropout_runs_every_row_in_full_and_says_why(rng, monkeypatch, caplog):
    """HF draws a dropout mask per row: the copies of a prompt differ, nothing is shared
    (the same draws as HF's under one seed)."""
    base, model = lora_model(dropout=0.1)
    ids, mask, labels = group_batch(rng, base.config.vocab_size)
    weights = torch.randn(*ids.shape, base.config.vocab_size, generator=rng)
    torch.manual_seed(0)
    want = loss_logits_grads(model, ids, mask, labels, weights)
    apply_rlhf_training_kernels(model)
    packed = packing_counter(monkeypatch)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, "rlhf_kernels.integrations"):
        got = loss_logits_grads(model, ids, mask, labels, weights)
    assert_same(got, want, mask)
    assert not packed
    assert any("an active dropout" in r.message for r in caplog.records)


def test_lora_packs_and_hooks_see_hf_tensors(rng, monkeypatch):
    """A LoRA projection packs as a whole; a hook on an MLP's projection keeps that MLP
    unpacked; a hook on an attention projection sees [B, T, H] (packing runs inside it)."""
    base, model = lora_model(dropout=0.0)
    ids, mask, labels = group_batch(rng, base.config.vocab_size)
    seen = []
    layers = base.model.layers
    layers[1].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    weights = torch.randn(*ids.shape, base.config.vocab_size, generator=rng)
    want = loss_logits_grads(model, ids, mask, labels, weights)
    apply_rlhf_training_kernels(model)
    packed = packing_counter(monkeypatch)
    seen.clear()
    got = loss_logits_grads(model, ids, mask, labels, weights)
    assert_same(got, want, mask)
    assert seen and set(seen) == {ids.shape + (base.config.hidden_size,)}
    # per pass (forward, recompute): every layer's q / k / v input and o input, and layer 0's
    # MLP input (layer 1's has the hook)
    assert len(packed) == 2 * (2 * base.config.num_hidden_layers + 1), packed


def test_unplanned_forwards_run_in_full_and_say_why(rng, caplog):
    model = apply_rlhf_training_kernels(build(CONFIGS["qwen2-bias"], seed=2))
    plain = build(CONFIGS["qwen2-bias"], seed=2)
    ids, mask, _ = group_batch(rng, model.config.vocab_size)
    embeds = plain.get_input_embeddings()(ids)
    with torch.no_grad(), caplog.at_level(logging.INFO, "rlhf_kernels.integrations"):
        for _ in range(2):
            got = model(inputs_embeds=embeds, attention_mask=mask).logits
        want = plain(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=2e-5 * want.abs().max().item(), rtol=0)
    said = [r.message for r in caplog.records if "shared prefixes" in r.message]
    assert said == ["shared prefixes: a forward with inputs_embeds instead of token ids runs "
                    "every row in full"]


@pytest.mark.parametrize("case", ["bf16", "autocast"])
def test_other_dtypes_run_every_row_in_full(case, rng, monkeypatch, caplog):
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    model = apply_rlhf_training_kernels(build(CONFIGS["llama-gqa-tied"], seed=2, dtype=dtype))
    ids, mask, _ = group_batch(rng, model.config.vocab_size)
    packed = packing_counter(monkeypatch)
    with torch.no_grad(), caplog.at_level(logging.INFO, "rlhf_kernels.integrations"), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        model(input_ids=ids, attention_mask=mask)
    assert not packed
    assert any("other than float32" in r.message for r in caplog.records)


def test_generate_with_repeated_prompts_equals_hf(rng):
    """HF's own loop: the prefill (an empty cache) is planned, the decode steps are not."""
    model = build(CONFIGS["llama-mqa-rope-scaling"], seed=8)
    prompts, mask = left_padded_prompts([6, 4], rng)
    ids, mask = prompts.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    options = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    want = model.generate(ids, **options)
    got = apply_rlhf_training_kernels(model).generate(ids, **options)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_an_mlp_called_on_its_own_is_not_packed(rng):
    """An attention's plan waits for its layer's MLP; an MLP called some other way, with an
    input of the batch's shape, computes every row (bit for bit what it computes unplanned)."""
    model = apply_rlhf_training_kernels(build(CONFIGS["llama-gqa-tied"], seed=3))
    ids, mask, _ = group_batch(rng, model.config.vocab_size)
    mlp = model.model.layers[-1].mlp
    x = torch.randn(*ids.shape, model.config.hidden_size, generator=rng)
    with torch.no_grad():
        want = mlp(x)  # no plan waiting
        model(input_ids=ids, attention_mask=mask)
        prefix_sharing._layer_plan.set(build_plan(ids, mask))  # as if an attention just ran
        got = mlp(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_kernels_applied_before_peft_wraps(rng, monkeypatch):
    """apply_rlhf_training_kernels, then peft: the LoRA layers hold our served Linear as their
    base layer, which packs inside them (equal to the same LoRA model without kernels)."""
    peft = pytest.importorskip("peft")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                  init_lora_weights=False, lora_dropout=0.0)
    plain = build(CONFIGS["qwen2-bias"], seed=4)
    served = apply_rlhf_training_kernels(build(CONFIGS["qwen2-bias"], seed=4))
    torch.manual_seed(1)  # the same LoRA weights in both
    plain = peft.get_peft_model(plain, peft.LoraConfig(**config)).train()
    torch.manual_seed(1)
    served = peft.get_peft_model(served, peft.LoraConfig(**config)).train()
    ids, mask, labels = group_batch(rng, plain.config.vocab_size)
    weights = torch.randn(*ids.shape, plain.config.vocab_size, generator=rng)
    want = loss_logits_grads(plain, ids, mask, labels, weights)
    packed = packing_counter(monkeypatch)
    got = loss_logits_grads(served, ids, mask, labels, weights)
    assert_same(got, want, mask)
    assert want[2] and all("lora_" in name for name in want[2])
    # the base layers of q (inside its LoRA) and k / v share one pack; o; the MLP
    assert len(packed) == 3 * plain.config.num_hidden_layers


def test_inference_mode_forward(rng, monkeypatch):
    """Inference tensors (no version counter) pack too."""
    model = build(CONFIGS["llama-gqa-tied"], seed=1)
    ids, mask, _ = group_batch(rng, model.config.vocab_size)
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).logits
        apply_rlhf_training_kernels(model)
        packed = packing_counter(monkeypatch)
        got = model(input_ids=ids, attention_mask=mask).logits
    assert len(packed) == 3 * model.config.num_hidden_layers
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0,
                               atol=2e-5 * want.abs().max().item())


def plain_and_served(family, seed=1, **config):
    config_cls, model_cls, kwargs = CONFIGS[family]
    spec = (config_cls, model_cls, dict(kwargs, **config))
    return build(spec, seed=seed).train(), apply_rlhf_training_kernels(build(spec, seed=seed)).train()


def sft_loss_logits_grads(model, ids, mask):
    """HF's own shifted loss with the padding at -100: the last left-pad position's logits
    predict the first real token and count."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return (out.loss.detach(), out.logits.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def test_eager_attention_left_padding_equals_hf_everywhere(rng):
    """Eager attention averages a fully masked (left-pad) query over the whole row, later
    tokens included: the copies' pad positions differ after the first attention, the check
    before each packing sees it, and every position (pads too) equals HF."""
    plain, served = plain_and_served("llama-gqa-tied", attn_implementation="eager")
    ids, mask, _ = group_batch(rng, plain.config.vocab_size, prompt_lengths=(6, 3))
    want = sft_loss_logits_grads(plain, ids, mask)
    got = sft_loss_logits_grads(served, ids, mask)
    assert_same(got, want, torch.ones_like(mask))


@pytest.mark.parametrize("hook", ["embedding-noise", "norm-per-row", "layer-steering"])
def test_forward_hooks_that_change_rows_equal_hf(hook, rng):
    """Hooks that make the copies differ (NEFTune-style embedding noise, per-row scaling, a
    per-row steering vector on a decoder layer's output): equal to HF."""
    plain, served = plain_and_served("qwen2-bias")
    ids, mask, labels = group_batch(rng, plain.config.vocab_size)
    rows = ids.shape[0]
    scale = torch.linspace(0.5, 1.5, rows)[:, None, None]
    steer = torch.randn(rows, 1, plain.config.hidden_size, generator=rng)
    noise = torch.randn(*ids.shape, plain.config.hidden_size, generator=rng) * 0.1
    for model in (plain, served):
        if hook == "embedding-noise":
            model.get_input_embeddings().register_forward_hook(lambda m, i, o: o + noise)
        if hook == "norm-per-row":
            model.model.layers[1].input_layernorm.register_forward_hook(lambda m, i, o: o * scale)
        if hook == "layer-steering":
            model.model.layers[0].register_forward_hook(lambda m, i, o: o + steer)
    weights = torch.randn(*ids.shape, plain.config.vocab_size, generator=rng)
    want = loss_logits_grads(plain, ids, mask, labels, weights)
    got = loss_logits_grads(served, ids, mask, labels, weights)
    assert_same(got, want, mask)


@pytest.mark.parametrize("case", ["backward-hook", "hidden-states"])
def test_watched_activations_run_every_row_in_full(case, rng, monkeypatch, caplog):
    """The copies' activation gradients are carried by the first copy: with a backward hook
    in the model, or the hidden states returned, nothing is packed, and a per-row gradient a
    hook sees equals HF's."""
    plain, served = plain_and_served("llama-gqa-tied")
    ids, mask, labels = group_batch(rng, plain.config.vocab_size)
    seen = {}
    for name, model in (("hf", plain), ("ours", served)):
        if case == "backward-hook":
            model.model.layers[1].self_attn.q_proj.register_full_backward_hook(
                lambda m, gin, gout, n=name: seen.__setitem__(n, gout[0].norm(dim=(1, 2))))
    packed = packing_counter(monkeypatch)
    with caplog.at_level(logging.INFO, "rlhf_kernels.integrations"):
        for name, model in (("hf", plain), ("ours", served)):
            out = model(input_ids=ids, attention_mask=mask, labels=labels,
                        output_hidden_states=case == "hidden-states")
            grads = torch.autograd.grad(out.loss, out.hidden_states[1]) \
                if case == "hidden-states" else out.loss.backward()
            if case == "hidden-states":
                seen[name] = grads[0].norm(dim=(1, 2))
    assert not packed
    torch.testing.assert_close(seen["ours"], seen["hf"], rtol=1e-5, atol=0)
    reason = "backward hooks" if case == "backward-hook" else "intermediate outputs"
    assert any(reason in r.message for r in caplog.records)
