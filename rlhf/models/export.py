"""Plain (HF-loadable) weights out of a training model: ZeRO-3 gathered, LoRA merged.

The step outputs of the trainer are written with `save_pretrained_merged`, so that the next step
(or anyone) loads them with `load_causal_lm` / `from_pretrained` without DeepSpeed or peft.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rlhf.models.lora import merge_lora
from rlhf_kernels.generation import unwrap  # engine / DDP / peft -> the model

PEFT_BASE_LAYER = ".base_layer."
PEFT_ADAPTER_MARK = "lora_"


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when some parameter is partitioned by ZeRO-3 (it then carries a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered(model: nn.Module, modifier_rank: int | None = None):
    """Context with the full ZeRO-3 parameters of `model`; a no-op when they are not partitioned.

    With `modifier_rank=r`, writes made by rank r to the gathered parameters are kept (scattered
    back on exit); with None they are discarded.
    """
    if not is_zero3_partitioned(model):
        return contextlib.nullcontext()
    import deepspeed  # only needed when the model was partitioned by it

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def write_on_main_process(write: Callable[[], None]) -> None:
    """Runs `write` on rank 0 only; the other ranks wait for it (so the files exist on return)."""
    if is_main_process():
        write()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's weights on the CPU: LoRA folded in, peft names undone, ZeRO-3 gathered.

    Collective under ZeRO-3 (every rank must call it). Tied weights stay one shared tensor. The
    whole model is gathered at once: meant for models that fit one device.
    """
    model = unwrap(model)
    state: dict[str, torch.Tensor] = {}
    copies: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    # merge first: merge_lora writes to the shards, which the gather then reads
    with merge_lora(model), gathered(model):
        for name, tensor in model.state_dict().items():
            if PEFT_ADAPTER_MARK in name:
                continue
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
            if key not in copies:
                copies[key] = tensor.detach().to("cpu", copy=True)
            state[name.replace(PEFT_BASE_LAYER, ".")] = copies[key]
    return state


def save_pretrained_merged(model: nn.Module, output_dir: str | Path, tokenizer=None) -> None:
    """Writes a causal LM (possibly LoRA-adapted, ZeRO-3 partitioned, inside an engine) as a plain
    `save_pretrained` folder, with the tokenizer when given. Collective; rank 0 writes."""
    model = unwrap(model)
    state = full_state_dict(model)

    def write():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)

    write_on_main_process(write)
