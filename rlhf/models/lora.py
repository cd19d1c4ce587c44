"""LoRA through peft, injected in place so the model keeps its class (and its generation adapter).

`apply_lora` wraps the chosen linear layers with peft LoRA layers and freezes everything else;
`merge_lora` folds the adapters into the base weights for fast generation and restores the base
weights bit for bit afterwards.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

ALL_LINEAR = "all-linear"


def _lora_target(model: nn.Module) -> nn.Module:
    """The module LoRA goes into: a value model's backbone, else the model itself."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) and hasattr(model, "v_head") else model


def apply_lora(model: nn.Module, dim: int, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: str | Sequence[str] | None = None) -> nn.Module:
    """Adds LoRA adapters in place; afterwards only the adapters (and a value head) are trainable.

    Args:
        model: a causal LM, or a `ValueModel` (LoRA goes into its backbone; `v_head` stays
            trainable).
        dim: the LoRA rank r (> 0).
        alpha: scaling numerator: the update is (alpha / dim) * B @ A.
        dropout: dropout on the adapter input.
        target_modules: module name suffixes to adapt (e.g. ["q_proj", "v_proj"]), or None /
            "all-linear" for every linear layer except the LM head.

    Returns:
        `model` itself (same object, same class).
    """
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"LoRA dim must be a positive int, got {dim!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    if target_modules is None:
        target_modules = ALL_LINEAR
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules is empty")
    config = LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        bias="none")
    try:
        inject_adapter_in_model(config, _lora_target(model))
    except ValueError as err:
        raise ValueError(f"cannot apply LoRA with target_modules={target_modules!r}: {err}") from err
    if hasattr(model, "v_head"):
        model.v_head.requires_grad_(True)
    return model


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    """The peft LoRA layers inside `model` (empty without LoRA)."""
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (names as in `model.state_dict()`), e.g. for a small checkpoint."""
    return {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}


def _gathered_for_write(params: list[nn.Parameter]):
    """Full ZeRO-3 parameters whose changes are kept (scattered back to the shards) on exit;
    a no-op for ordinary parameters."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


@contextlib.contextmanager
def merge_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Merges the LoRA adapters into the base weights inside the block; a no-op without LoRA.

    While merged, each adapted layer runs as a plain linear layer (peft skips the adapter path).
    On exit the base weights are restored from a copy rather than by subtracting the delta,
    which would drift in bf16 / fp16 over many cycles; the copies cost the memory of the adapted
    weights while the block runs.

    ZeRO-3: the merged weights are written back to the shards, so that forwards inside the block
    (which gather the shards) see them, and a `GatheredParameters` opened inside the block gives
    the merged weights. Enter it outside any `GatheredParameters` over the same parameters
    (DeepSpeed refuses overlapping gathers).
    """
    layers = lora_layers(model)
    params = [p for layer in layers for p in layer.parameters()]
    bases = [layer.get_base_layer().weight for layer in layers]
    with _gathered_for_write(params), torch.no_grad():
        originals = [w.detach().clone() for w in bases]
    try:
        with _gathered_for_write(params), torch.no_grad():
            for layer in layers:
                layer.merge()
        yield model
    finally:
        with _gathered_for_write(params), torch.no_grad():
            for layer, weight, original in zip(layers, bases, originals):
                weight.copy_(original)
                # the base weight is back: nothing left for peft to subtract
                layer.merged_adapters.clear()
