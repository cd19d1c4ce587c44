"""generation.generate: token-for-token equality with HF, behaviour log-probs, the cache, the
fallback, bad input. The fused path runs with the backend `auto` picks here (cpu kernels)."""
import logging

import pytest
import torch

from rlhf_kernels.generation import (generate, loop, new_cache, position_ids_from_mask,
                                     response_logprobs)

from tiny_models import CONFIGS, FALLBACK, build, left_padded_prompts

LENGTHS = [5, 1, 9, 3]  # several prompt lengths in one batch (left padded), one of length 1


def hf_greedy(model, ids, mask, n, eos):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                          do_sample=False, eos_token_id=eos, pad_token_id=0)


def teacher_forced(model, out, prompt_mask, temperature):
    full = torch.cat([prompt_mask, out.response_mask], 1)
    return response_logprobs(model, out.sequences, full, prompt_mask.shape[1], temperature)


def early_eos(response):
    """A token row 0 emits among its first three that some other row has not emitted by then
    (as EOS it ends row 0 while others run), or None."""
    for i, token in enumerate(response[0, :3].tolist()):
        if any(token not in row[:i + 1].tolist() for row in response[1:]):
            return token
    return None


@pytest.mark.parametrize("family", list(CONFIGS))
def test_greedy_equals_hf_token_for_token(family, rng, monkeypatch):
    # random tiny models can repeat one token in every row: draw until some row differs early
    for _ in range(10):
        model = build(CONFIGS[family], seed=int(torch.randint(1 << 30, (1,), generator=rng)))
        ids, mask = left_padded_prompts(LENGTHS, rng)
        ours = generate(model, ids, mask, max_new_tokens=12, temperature=0, eos_token_id=[])
        assert ours.path.startswith("fused:")
        assert torch.equal(ours.sequences, hf_greedy(model, ids, mask, 12, eos=[]))
        eos = early_eos(ours.sequences[:, ids.shape[1]:])
        if eos is not None:
            break
    assert eos is not None, "ten models whose rows all begin alike"
    # per-sequence EOS: rows stop independently
    compactions = []  # row 0 ending first drops it from the batch (a quarter of 4 rows)
    compact = loop._Decoder.compact
    monkeypatch.setattr(loop._Decoder, "compact", lambda self, keep, n: (
        compactions.append(len(keep)), compact(self, keep, n)))
    ours = generate(model, ids, mask, max_new_tokens=12, temperature=0, eos_token_id=eos,
                    pad_token_id=0)
    theirs = hf_greedy(model, ids, mask, 12, eos)
    assert torch.equal(ours.sequences, theirs)
    response = ours.sequences[:, ids.shape[1]:]
    assert ours.response_mask[0].sum() <= 3  # row 0 stopped at its EOS
    assert compactions and compactions[0] <= 3
    for row in range(len(LENGTHS)):  # mask = 1 up to and including the first EOS, pads after
        hits = (response[row] == eos).nonzero().flatten().tolist()
        stop = hits[0] + 1 if hits else response.shape[1]
        assert ours.response_mask[row].tolist() == [1] * stop + [0] * (response.shape[1] - stop)
        assert (response[row, stop:] == 0).all()


@pytest.mark.parametrize("family", ["llama-gqa-tied", "mistral-sliding-window", "gpt2"])
def test_repeated_prompts_are_prefilled_once(family, rng, monkeypatch):
    """A group of completions per prompt (GRPO): one prefill row per distinct prompt, and
    every row continues from its own prompt's keys and values."""
    model = build(CONFIGS[family], seed=5)
    ids, mask = left_padded_prompts([5, 1, 9], rng)
    order = torch.tensor([0, 2, 0, 1, 2, 0])
    ids, mask = ids[order], mask[order]
    prefilled = []

    class Recorded(loop.PrefillAttention):
        def __init__(self, cache, attention_mask, windows):
            prefilled.append(attention_mask.shape[0])
            super().__init__(cache, attention_mask, windows)
    monkeypatch.setattr(loop, "PrefillAttention", Recorded)
    ours = generate(model, ids, mask, max_new_tokens=8, temperature=0, eos_token_id=[])
    assert prefilled == [3]
    assert torch.equal(ours.sequences, hf_greedy(model, ids, mask, 8, eos=[]))
    out = generate(model, ids, mask, max_new_tokens=8, temperature=1.0, eos_token_id=[],
                   generator=rng)
    expected = teacher_forced(model, out, mask, 1.0) * out.response_mask
    torch.testing.assert_close(out.logprobs, expected.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama-gqa-tied", "mistral-sliding-window", "gpt2", "opt"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0),
                                                     (0.7, 20, 1.0), (1.3, 0, 0.9)])
def test_behaviour_logprobs_equal_teacher_forced(family, temperature, top_k, top_p, rng):
    model = build(CONFIGS[family], seed=3)
    ids, mask = left_padded_prompts(LENGTHS, rng)
    out = generate(model, ids, mask, max_new_tokens=10, temperature=temperature, top_k=top_k,
                   top_p=top_p, eos_token_id=2, pad_token_id=0, generator=rng)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == out.response_mask.shape
    expected = teacher_forced(model, out, mask, temperature) * out.response_mask
    # fp32: the two paths sum in different orders; 1e-4 is ~100x their observed gap
    torch.testing.assert_close(out.logprobs, expected.float(), atol=1e-4, rtol=0)
    assert (out.logprobs[out.response_mask == 0] == 0).all()


def test_top_k_1_is_greedy(rng):
    model = build(CONFIGS["qwen2-bias"], seed=4)
    ids, mask = left_padded_prompts(LENGTHS, rng)
    greedy = generate(model, ids, mask, max_new_tokens=8, temperature=0, eos_token_id=[])
    top1 = generate(model, ids, mask, max_new_tokens=8, temperature=0.8, top_k=1,
                    eos_token_id=[], generator=rng)
    assert torch.equal(greedy.sequences, top1.sequences)


def test_seeded_sampling_is_reproducible(rng):
    model = build(CONFIGS["llama-gqa-tied"], seed=5)
    ids, mask = left_padded_prompts(LENGTHS, rng)

    def run(seed):
        return generate(model, ids, mask, max_new_tokens=16, temperature=1.0, eos_token_id=[],
                        generator=torch.Generator().manual_seed(seed))
    first, again, other = run(11), run(11), run(12)
    assert torch.equal(first.sequences, again.sequences)
    assert torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.sequences, other.sequences)


def test_cache_is_reused_across_calls(rng):
    model = build(CONFIGS["llama-gqa-tied"], seed=6)
    cache = new_cache(model, batch=8, max_len=40)
    keys = cache.keys[0]
    for lengths in (LENGTHS, [7, 2]):
        ids, mask = left_padded_prompts(lengths, rng)
        fresh = generate(model, ids, mask, max_new_tokens=10, temperature=0, eos_token_id=[])
        reused = generate(model, ids, mask, max_new_tokens=10, temperature=0, eos_token_id=[],
                          cache=cache)
        assert torch.equal(fresh.sequences, reused.sequences)
    assert cache.keys[0] is keys and keys.abs().sum() > 0
    ids, mask = left_padded_prompts([30], rng)
    with pytest.raises(ValueError, match="cannot hold batch 1 x 50 tokens"):
        generate(model, ids, mask, max_new_tokens=20, cache=cache)


def test_lora_unmerged_falls_back_merged_is_fused(rng):
    peft = pytest.importorskip("peft")
    base = build(CONFIGS["llama-gqa-tied"], seed=7)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    ids, mask = left_padded_prompts(LENGTHS, rng)
    unmerged = generate(model, ids, mask, max_new_tokens=6, temperature=0, eos_token_id=[])
    assert unmerged.path.startswith("fallback") and "not merged" in unmerged.path
    model.merge_adapter()
    merged = generate(model, ids, mask, max_new_tokens=6, temperature=0, eos_token_id=[])
    model.unmerge_adapter()
    assert merged.path == "fused:llama"
    assert torch.equal(merged.sequences, unmerged.sequences)


def test_family_without_adapter_falls_back_and_says_so_once(rng, caplog):
    model = build(FALLBACK, seed=8)
    ids, mask = left_padded_prompts(LENGTHS, rng)
    with caplog.at_level(logging.WARNING, logger="rlhf_kernels.generation"):
        out = generate(model, ids, mask, max_new_tokens=8, temperature=0, eos_token_id=[])
        generate(model, ids, mask, max_new_tokens=8, temperature=0, eos_token_id=[])
    assert out.path.startswith("fallback") and "gpt_neox" in out.path
    said = [r for r in caplog.records if "gpt_neox" in r.getMessage()]
    assert len(said) <= 1  # once per process (an earlier test may have said it already)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 8, eos=[]))
    torch.testing.assert_close(out.logprobs, teacher_forced(model, out, mask, 0.0).float(),
                               atol=1e-5, rtol=0)


def test_bfloat16_model_runs_close_to_teacher_forced(rng):
    model = build(CONFIGS["llama-gqa-tied"], seed=9, dtype=torch.bfloat16)
    ids, mask = left_padded_prompts(LENGTHS, rng)
    out = generate(model, ids, mask, max_new_tokens=8, temperature=1.0, eos_token_id=[],
                   generator=rng)
    assert out.path == "fused:llama" and out.logprobs.dtype == torch.float32
    expected = teacher_forced(model, out, mask, 1.0).float()
    # bf16 activations (8 mantissa bits) through 2 layers: logits differ by ~1e-2 between the
    # cached and the full forward; log-probs of peaked distributions inherit that
    torch.testing.assert_close(out.logprobs, expected, atol=0.1, rtol=0)


def test_position_ids_ignore_left_and_right_padding():
    # real tokens count 0, 1, 2, ... wherever the padding is; padding gets 0 (HF generate's)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3], [0, 1, 0, 0],
                                                     [0, 0, 1, 0]]
    assert torch.equal(position_ids_from_mask(mask.bool()), position_ids_from_mask(mask))


def test_max_new_tokens_zero_returns_the_prompts(rng):
    model = build(CONFIGS["gpt2"], seed=1)
    ids, mask = left_padded_prompts(LENGTHS, rng)
    out = generate(model, ids, mask, max_new_tokens=0)
    assert torch.equal(out.sequences, ids)
    assert out.logprobs.shape == (len(LENGTHS), 0) and out.response_mask.shape == (4, 0)


@pytest.mark.parametrize("make_input,error,match", [
    (lambda ids, mask: (ids[:0], mask[:0], {}), ValueError, "empty: the batch has no prompt"),
    (lambda ids, mask: (ids, mask[:, 1:], {}), ValueError, "attention_mask shape"),
    (lambda ids, mask: (ids, mask.flip(1), {}), ValueError, "left padded"),
    (lambda ids, mask: (ids, mask * 2, {}), ValueError, "only 0 and 1"),
    (lambda ids, mask: (ids, torch.cat([mask[:, :-1], torch.zeros_like(mask[:, -1:])], 1), {}),
     ValueError, "left padded|empty"),
    (lambda ids, mask: (ids.float(), mask, {}), TypeError, "integer token ids"),
    (lambda ids, mask: (ids, mask, {"max_new_tokens": -1}), ValueError, "max_new_tokens"),
    (lambda ids, mask: (ids, mask, {"temperature": -1.0}), ValueError, "temperature"),
    (lambda ids, mask: (ids, mask, {"top_p": 0.0}), ValueError, "top_p"),
    (lambda ids, mask: (ids, mask, {"max_new_tokens": 200}), ValueError, "128 positions"),
])
def test_bad_input(make_input, error, match, rng):
    model = build(CONFIGS["gpt2"], seed=1)
    ids, mask = left_padded_prompts(LENGTHS, rng)
    ids, mask, options = make_input(ids, mask)
    options = {"max_new_tokens": 4, **options}
    with pytest.raises(error, match=match):
        generate(model, ids, mask, **options)


def test_empty_prompt_row_is_an_error(rng):
    model = build(CONFIGS["llama-gqa-tied"], seed=1)
    ids, mask = left_padded_prompts([3, 2], rng)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        generate(model, ids, mask, max_new_tokens=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("family", ["llama-gqa-tied", "qwen3-qk-norm", "gpt2"])
def test_cuda_graph_decode_equals_hf(family, rng):
    """The captured decode step (CUDA graph, our CUDA / Triton kernels) against HF on the GPU."""
    model = build(CONFIGS[family], seed=10).cuda()
    ids, mask = left_padded_prompts(LENGTHS, rng)
    ids, mask = ids.cuda(), mask.cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    ours = generate(model, ids, mask, max_new_tokens=12, temperature=0, eos_token_id=[])
    plain = generate(model, ids, mask, max_new_tokens=12, temperature=0, eos_token_id=[],
                     cuda_graph=False)
    assert torch.equal(ours.sequences, plain.sequences)
    assert torch.equal(ours.sequences, hf_greedy(model, ids, mask, 12, eos=[]))
    expected = teacher_forced(model, ours, mask, 0.0).float()
    torch.testing.assert_close(ours.logprobs, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", [name for name in CONFIGS
                                    if not name.startswith(("gpt2", "opt"))])
def test_decode_position_tables_equal_the_rotary_module_bitwise(family, rng):
    """The decode loop looks RoPE tables up instead of calling HF's rotary module every step:
    the same bits for any positions, rope scaling included."""
    from rlhf_kernels.generation.adapters import adapter_for
    adapter, _ = adapter_for(build(CONFIGS[family], seed=0))
    positions = torch.randint(0, 40, (3, 5), generator=rng)
    like = torch.empty(0)
    per_step = adapter.prepare(positions, like)
    adapter.tabulate_positions(40)
    assert adapter.position_tables is not None
    for looked_up, computed in zip(adapter.prepare(positions, like), per_step):
        assert torch.equal(looked_up, computed) and looked_up.shape == computed.shape
