"""DeepSpeed configs and engines for the trainer's models (training: actor, critic; frozen:
reference, reward), on GPUs or on the CPU (gloo backend, torch AdamW)."""
from __future__ import annotations

import copy
import functools
import logging
import math
import os
import socket
from collections.abc import Iterable
from typing import Any, NamedTuple

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn

from ..config import ADAM_BETAS, DTYPES, SCHEDULERS

logger = logging.getLogger(__name__)

ADAM_EPS = 1e-8
# ZeRO-3 knobs of DeepSpeed-Chat: small parameters stay resident, bounded prefetch / live sizes
ZERO3_SETTINGS = {
    "stage3_param_persistence_threshold": 1e4,
    "stage3_max_live_parameters": 3e7,
    "stage3_prefetch_bucket_size": 3e7,
}


def _precision_sections(dtype: str) -> dict[str, Any]:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return {"bf16": {"enabled": dtype == "bf16"},
            "fp16": {"enabled": dtype == "fp16", "loss_scale_window": 100}}


def _zero_section(stage: int, offload: bool) -> dict[str, Any]:
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if offload and stage == 0:
        raise ValueError("offload needs ZeRO stage 1, 2 or 3 (stage 0 keeps everything on the device)")
    device = "cpu" if offload else "none"
    zero: dict[str, Any] = {"stage": stage, "offload_optimizer": {"device": device}}
    if stage == 3:
        zero["offload_param"] = {"device": device}
        zero.update(ZERO3_SETTINGS)
    return zero


LR_SCHEDULE_KEY = "lr_schedule"  # read by init_train_engine; DeepSpeed ignores unknown keys


def _schedule_section(scheduler: str, warmup_steps: int, total_steps: int | None) -> dict[str, Any]:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if scheduler != "constant":
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"the {scheduler} schedule needs total_steps > 0, got {total_steps!r}")
        if warmup_steps >= total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be below total_steps ({total_steps})")
    return {"kind": scheduler, "warmup_steps": warmup_steps, "total_steps": total_steps}


def lr_factor(step: int, *, kind: str, warmup_steps: int, total_steps: int | None) -> float:
    """The multiplier of the base learning rate at optimizer step `step` (0-based).

    Linear warmup (s + 1) / warmup_steps, so that no step runs at lr 0; then "constant" stays at
    1, "linear" and "cosine" decay from 1 at step warmup_steps towards 0 at total_steps (and
    stay at 0 after it).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_ds_config(*, stage: int = 0, offload: bool = False, dtype: str = "fp32", micro_batch: int = 1,
                   grad_accum: int = 1, train_batch_size: int | None = None, lr: float = 1e-5,
                   weight_decay: float = 0.0, warmup_steps: int = 0, total_steps: int | None = None,
                   scheduler: str = "cosine", torch_adam: bool = False, gradient_clipping: float = 1.0,
                   betas: Iterable[float] = ADAM_BETAS, inference: bool = False,
                   steps_per_print: int = 100) -> dict[str, Any]:
    """A DeepSpeed config dict for a trained model, or (`inference=True`) for a frozen one.

    Args:
        stage: ZeRO stage 0-3. A frozen model is partitioned only at stage 3 (else stage 0).
        offload: ZeRO-Offload: optimizer states (and at stage 3 the parameters) on the CPU.
        dtype: "fp32", "bf16" or "fp16" (mixed precision with DeepSpeed's loss scaling).
        micro_batch: sequences per device per forward.
        grad_accum: micro batches per optimizer step.
        train_batch_size: optional global batch; DeepSpeed checks it equals
            micro_batch * grad_accum * world size.
        lr, weight_decay, betas: AdamW settings (eps 1e-8).
        warmup_steps, total_steps, scheduler: learning-rate schedule (see `lr_factor`):
            "cosine" | "linear" (warmup then decay to 0 at total_steps) or "constant". Kept under
            the config's "lr_schedule" key, which `init_train_engine` turns into the scheduler.
        torch_adam: torch.optim.AdamW instead of DeepSpeed's fused / CPU Adam (no JIT build).
        gradient_clipping: global gradient-norm clip (0 disables it).
        inference: the config of a frozen model: no optimizer, no scheduler.
        steps_per_print: DeepSpeed's own progress log interval.
    """
    for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "steps_per_print": steps_per_print,
        "wall_clock_breakdown": False,
        **_precision_sections(dtype),
    }
    if train_batch_size is not None:
        config["train_batch_size"] = train_batch_size
    if inference:
        config["zero_optimization"] = _zero_section(3 if stage == 3 else 0, offload and stage == 3)
        return config
    if lr <= 0 or weight_decay < 0 or gradient_clipping < 0:
        raise ValueError(f"need lr > 0, weight_decay >= 0, gradient_clipping >= 0; got lr={lr}, "
                         f"weight_decay={weight_decay}, gradient_clipping={gradient_clipping}")
    config["zero_optimization"] = _zero_section(stage, offload)
    config["gradient_clipping"] = gradient_clipping
    config["prescale_gradients"] = False
    config["optimizer"] = {"type": "AdamW", "params": {
        "lr": lr, "betas": [float(b) for b in betas], "eps": ADAM_EPS, "weight_decay": weight_decay,
        "torch_adam": bool(torch_adam)}}
    config[LR_SCHEDULE_KEY] = _schedule_section(scheduler, warmup_steps, total_steps)
    return config


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _skip_shm_comm_build() -> None:
    """Keeps DeepSpeed from JIT-compiling its shared-memory CPU collectives (1-2 minutes on a
    small machine) for a single process, which has nothing to all-reduce with."""
    compatible = deepspeed.ops.__compatible_ops__  # DeepSpeed keeps and reads this one dict
    compatible["deepspeed_shm_comm"] = False


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialises torch.distributed through DeepSpeed, once.

    Under the `deepspeed` launcher the environment describes the job; a plain `python` run
    becomes a single-process job (rank 0 of 1, on a free local port). The backend defaults to
    the accelerator's (nccl on GPUs, gloo on the CPU).
    """
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            # a fixed default port would collide with other single-process runs on the machine
            os.environ["MASTER_PORT"] = str(_free_port() if os.environ["WORLD_SIZE"] == "1" else 29500)
        if on_cpu() and os.environ["WORLD_SIZE"] == "1":
            _skip_shm_comm_build()
        deepspeed.init_distributed(dist_backend=backend or get_accelerator().communication_backend_name(),
                                   verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not on_cpu():
        get_accelerator().set_device(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def _check_dtype_runs_here(ds_config: dict[str, Any]) -> None:
    if on_cpu() and ds_config.get("fp16", {}).get("enabled", False):
        raise ValueError("fp16 does not run on the CPU with DeepSpeed: use dtype='bf16' or 'fp32'")


def config_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The parameter dtype a DeepSpeed config trains / runs in."""
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two groups: with weight decay, and without it for biases and
    norm weights (every parameter of fewer than 2 dimensions)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def init_train_engine(model: nn.Module, ds_config: dict[str, Any],
                      params: Iterable[torch.nn.Parameter] | Iterable[dict] | None = None):
    """`deepspeed.initialize` with the config's AdamW and learning-rate schedule (a LambdaLR,
    stepped by the engine after each optimizer step).

    Args:
        model: the module to train (its trainable parameters are optimised).
        ds_config: from `make_ds_config` (not modified).
        params: parameters or parameter groups to optimise; by default the trainable parameters,
            biases and norm weights without weight decay.

    Returns:
        The DeepSpeed engine (`engine(batch)`, `engine.backward(loss)`, `engine.step()`).
    """
    if "optimizer" not in ds_config:
        raise ValueError("ds_config has no optimizer section: build it with make_ds_config(inference=False)")
    _check_dtype_runs_here(ds_config)
    config = copy.deepcopy(ds_config)
    optimizer_params = config["optimizer"]["params"]
    if on_cpu() and not optimizer_params.get("torch_adam", False):
        # DeepSpeed's CPU Adam is JIT-compiled on first use (minutes); torch's AdamW is not
        logger.info("running on the CPU: using torch.optim.AdamW")
        optimizer_params["torch_adam"] = True
    if optimizer_params.get("torch_adam") and "foreach" not in optimizer_params:
        # torch's fused AdamW (one kernel over all tensors, CPU and GPU) rather than its
        # default per-tensor loop on the CPU
        optimizer_params["fused"] = True
    if params is None:
        params = weight_decay_groups(model, optimizer_params.get("weight_decay", 0.0))
    params = list(params)
    if not params:
        raise ValueError("nothing to train: the model has no parameter with requires_grad=True")
    schedule = config.pop(LR_SCHEDULE_KEY, None)
    lr_scheduler = None
    if schedule is not None:
        factor = functools.partial(lr_factor, **schedule)
        lr_scheduler = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=factor)
    init_distributed()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                      lr_scheduler=lr_scheduler)
    if engine.world_size == 1 and engine.zero_optimization_stage() == 0:
        # one rank: the all-reduce after each backward would flatten every gradient, reduce it
        # with itself and copy it back (~1 ms per step for the demo's tiny model)
        engine.enable_backward_allreduce = False
        # and the fp32 clip (DeepSpeed's runs one norm, one multiply per parameter and an
        # all-reduce of the total: ~0.6 ms per step of the tiny model, 0.18 ms this way)
        engine.clip_fp32_gradients = functools.partial(clip_gradients_foreach, engine)
    return engine


def clip_gradients_foreach(engine) -> torch.Tensor:
    """DeepSpeed's fp32 gradient clip on one rank: scale every gradient by
    min(1, max_norm / (total L2 norm + 1e-6)), in torch's multi-tensor kernels."""
    return torch.nn.utils.clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(),
                                          foreach=True)


def init_eval_engine(model: nn.Module, ds_config: dict[str, Any]):
    """Prepares a frozen model (reference, reward): no gradients, eval mode.

    At ZeRO stage 3 the parameters are partitioned by a DeepSpeed engine (returned); otherwise
    the module itself is returned, in the config's dtype on this rank's device.
    """
    _check_dtype_runs_here(ds_config)
    model.requires_grad_(False)
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler", LR_SCHEDULE_KEY)}
        init_distributed()
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine
    device = get_accelerator().current_device_name()
    return model.to(device=device, dtype=config_dtype(ds_config)).eval()
