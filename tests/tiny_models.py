"""Tiny randomly initialised causal LMs of each family the generation adapters cover.

initializer_range 0.2 makes the next-token distributions peaked, so greedy argmaxes are far
from ties and the fp32 token-for-token comparison with HF tests the math, not rounding.
"""
import torch
import transformers as tf

VOCAB = 211  # not a power of two
COMMON = dict(vocab_size=VOCAB, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, **COMMON)

CONFIGS = {
    "llama-gqa-tied": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(LLAMA, tie_word_embeddings=True)),
    "llama-mqa-rope-scaling": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        LLAMA, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16))),
    "mistral-sliding-window": (tf.MistralConfig, tf.MistralForCausalLM, dict(
        LLAMA, sliding_window=6)),
    "qwen2-bias": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(LLAMA, tie_word_embeddings=True)),
    "qwen3-qk-norm": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(LLAMA, head_dim=24)),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(
        n_embd=64, n_layer=2, n_head=4, n_positions=128, **COMMON)),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM, dict(
        hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=128, **COMMON)),
    "opt-post-norm-projected": (tf.OPTConfig, tf.OPTForCausalLM, dict(
        hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, do_layer_norm_before=False, max_position_embeddings=128,
        **COMMON)),
}
# a causal LM with no adapter: the fallback path
FALLBACK = (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=128, **COMMON))


def build(spec, seed=0, dtype=torch.float32):
    config_cls, model_cls, kwargs = spec
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).to(dtype).eval()


def left_padded_prompts(lengths, generator, vocab=VOCAB, pad=0):
    """[B, max(lengths)] ids with left padding, and the mask; tokens avoid the specials 0-2."""
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
        ids[row, :width - n] = pad
    return ids, mask
