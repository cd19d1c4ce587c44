"""csrc/decode_layer.h: a Llama-family block of a decode step in one C++ call. It composes the
CPU kernels the Python block calls, in its order, so generation with it must equal generation
without it bit for bit (tokens and behaviour log-probs), in every Llama-family feature."""
import pytest
import torch

from rlhf_kernels.generation import generate
from rlhf_kernels.generation.adapters import base, llama

from tiny_models import CONFIGS, build, left_padded_prompts

LLAMA_FAMILY = [name for name in CONFIGS if not name.startswith(("gpt2", "opt"))]


def run(model, ids, mask, seed):
    return generate(model, ids, mask, max_new_tokens=10, temperature=1.0, eos_token_id=[],
                    generator=torch.Generator().manual_seed(seed))


@pytest.mark.skipif(base.decode_layer_kernel() is None,
                    reason="the extension is not built (rlhf_kernels._C)")
@pytest.mark.parametrize("family", LLAMA_FAMILY)
@pytest.mark.parametrize("lengths", [[5, 1, 9, 3], [4] * 9])  # batch 9: at::linear, not skinny
def test_decode_layer_equals_the_python_block_bitwise(family, lengths, rng, monkeypatch):
    model = build(CONFIGS[family], seed=11)
    ids, mask = left_padded_prompts(lengths, rng)
    calls = []
    kernel = base.decode_layer_kernel()
    monkeypatch.setattr(llama, "decode_layer_kernel",
                        lambda: lambda *a: (calls.append(1), kernel(*a))[1])
    fused = run(model, ids, mask, seed=1)
    assert calls, "the decode-layer kernel was not used"
    monkeypatch.setattr(llama, "decode_layer_kernel", lambda: None)
    python = run(model, ids, mask, seed=1)
    assert torch.equal(fused.sequences, python.sequences)
    assert torch.equal(fused.logprobs, python.logprobs)


@pytest.mark.skipif(base.decode_layer_kernel() is None,
                    reason="the extension is not built (rlhf_kernels._C)")
def test_decode_layer_rejects_bad_input():
    kernel = base.decode_layer_kernel()
    h = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="weights and biases"):
        kernel(h, [torch.ones(8)] * 2, [torch.ones(8, 8)] * 6, [None] * 6, 1e-6, 0.0, 2, 1,
               torch.ones(2, 4), torch.zeros(2, 4), torch.zeros(2, 1, 4, 4),
               torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int32),
               torch.zeros(2, dtype=torch.int32), 0.5)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(h.double(), [torch.ones(8)] * 2, [torch.ones(8, 8)] * 7, [None] * 7, 1e-6, 0.0,
               2, 1, torch.ones(2, 4), torch.zeros(2, 4), torch.zeros(2, 1, 4, 4),
               torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int32),
               torch.zeros(2, dtype=torch.int32), 0.5)
