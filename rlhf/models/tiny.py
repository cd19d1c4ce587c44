"""The "tiny" demo model: a small random Llama-style LM and a tokenizer trained on the task's texts.

Everything here runs offline in seconds on a CPU, so the whole pipeline can be exercised without
downloading anything.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Trains a BPE tokenizer on `texts`.

    Words are split on spaces with the space kept as a "▁" prefix (Metaspace), so decoding gives
    back the text exactly for any text written with the characters seen in training; other
    characters become `<unk>`. No BOS and no EOS are added by `encode`: the data pipeline appends
    EOS where a sequence ends. There is no chat template.

    Args:
        texts: the training corpus (any iterable of strings; read once).
        vocab_size: the largest vocabulary wanted, special tokens included. The result can be
            smaller when the corpus has fewer distinct merges.

    Returns:
        A tokenizer with `<pad>` (id 0), `</s>` (id 1, the EOS) and `<unk>` (id 2).
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    texts = list(texts)
    if not texts or not any(isinstance(t, str) and t for t in texts):
        raise ValueError("texts must hold at least one non-empty string to train a tokenizer")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts must be strings, got {type(bad).__name__}")

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN,
                                   eos_token=EOS_TOKEN, unk_token=UNK_TOKEN)


def tiny_config(tokenizer: PreTrainedTokenizerBase, *, num_layers: int = 2, hidden_size: int = 128,
                num_heads: int = 4, num_kv_heads: int = 2, max_positions: int = 512) -> LlamaConfig:
    """A small Llama config sized to `tokenizer`: GQA attention and tied input/output embeddings."""
    if num_heads % num_kv_heads or hidden_size % num_heads:
        raise ValueError(f"need num_heads % num_kv_heads == 0 and hidden_size % num_heads == 0, got "
                         f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def random_causal_lm(config: LlamaConfig, *, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised model from `config`, the same for the same seed.

    The global RNG state is left untouched so that seeding the model does not change the data
    order or the sampling of the caller.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def load_tiny(texts: Iterable[str], seed: int = 0, *, vocab_size: int = 512, **config_kwargs
              ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Trains a tokenizer on `texts` and builds a random tiny model for it.

    Args:
        texts: the corpus the tokenizer is trained on (prompts and responses of the task).
        seed: seeds the weights.
        vocab_size: the tokenizer's largest vocabulary.
        **config_kwargs: passed to `tiny_config` (num_layers, hidden_size, num_heads, ...).

    Returns:
        (model, tokenizer), the model in float32.
    """
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    return random_causal_lm(tiny_config(tokenizer, **config_kwargs), seed=seed), tokenizer
