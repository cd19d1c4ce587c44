"""What every step builds from a RunConfig: tokenizer + model, DeepSpeed config, batch order."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import DTYPES
from ..data import load_source, normalize_records
from ..data.synthetic import synthetic_texts
from ..engine import make_ds_config
from ..models import apply_lora, load_causal_lm, load_tokenizer, train_tokenizer

log = logging.getLogger("rlhf")
# the torch dtype of each config.DTYPES name
TORCH_DTYPES = dict(zip(DTYPES, (torch.float32, torch.bfloat16, torch.float16)))


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def step_dir(cfg, step: str) -> Path:
    """Where step `step` ("sft", "rm") writes its model and later steps read it."""
    section = getattr(cfg, step)
    return Path(section.model_path) if section.model_path else Path(cfg.output) / step


def _corpus(cfg) -> list[str]:
    """Texts a tokenizer for the "tiny" model is trained on: the configured sources."""
    texts = []
    for spec in cfg.data.sources:
        if spec.split(":")[0] == "synthetic":
            texts += synthetic_texts(cfg.seed)
            continue
        for record in normalize_records(load_source(spec, seed=cfg.seed), spec):
            texts += [record[k] for k in ("prompt", "response", "chosen", "rejected") if k in record]
    return texts


def load_base(cfg, name_or_path: str | Path, *, trainable=True):
    """(tokenizer, causal LM) for a step. "tiny" trains its tokenizer on the data first;
    LoRA is applied when configured and the model is to be trained."""
    m = cfg.model
    if str(name_or_path) == "tiny":
        tokenizer = train_tokenizer(_corpus(cfg))
        model = load_causal_lm("tiny", tokenizer=tokenizer, seed=cfg.seed)
    else:
        # the config key a missing local path came from, for its error
        setting = "model.name_or_path" if str(name_or_path) == m.name_or_path else None
        tokenizer = load_tokenizer(m.tokenizer or name_or_path,
                                   setting="model.tokenizer" if m.tokenizer else setting)
        model = load_causal_lm(name_or_path, dtype=TORCH_DTYPES[m.dtype], tokenizer=tokenizer,
                               gradient_checkpointing=m.gradient_checkpointing and trainable,
                               setting=setting)
    if trainable and m.lora_dim > 0:
        apply_lora(model, m.lora_dim, m.lora_alpha, m.lora_dropout, list(m.lora_target_modules))
    return tokenizer, model


# the settings that lengthen a step's run, by config section
_RUN_LENGTH = {"sft": "sft.max_steps / sft.epochs", "rm": "rm.max_steps / rm.epochs",
               "rl": "rl.steps / rl.epochs"}


def check_warmup(key: str, warmup: int, total_steps: int, scheduler: str) -> None:
    """A warm-up of at least the run's optimizer steps: ValueError naming `key` ("sft.warmup")
    for cosine / linear, whose decay would never start; a warning for constant."""
    if warmup <= 0 or warmup < total_steps:
        return
    length = _RUN_LENGTH.get(key.split(".")[0], "the step's max_steps / epochs")
    message = (f"{key} = {warmup} >= the {total_steps} optimizer steps of this run: lower "
               f"{key} or raise {length}")
    if scheduler != "constant":
        raise ValueError(message)
    if warmup > total_steps:  # constant: at warmup == total_steps the last step reaches the lr
        log.warning("%s (the learning rate never reaches its peak)", message)


def ds_config(cfg, *, lr, weight_decay, micro_batch, grad_accum, warmup, total_steps, scheduler,
              inference=False, offload=None, warmup_key=None):
    """The DeepSpeed config of one model of the run (`offload` None: deepspeed.offload).
    `warmup_key` ("sft.warmup") names `warmup` in the error of a warm-up that does not fit in
    `total_steps` (a trained model's config needs it)."""
    d = cfg.deepspeed
    if not inference:
        if warmup_key is None:
            raise TypeError("ds_config of a trained model needs warmup_key (e.g. 'sft.warmup')")
        check_warmup(warmup_key, warmup, max(total_steps, 1), scheduler)
    return make_ds_config(stage=d.zero_stage, offload=d.offload if offload is None else offload,
                          dtype=cfg.model.dtype, micro_batch=micro_batch, grad_accum=grad_accum,
                          lr=lr, weight_decay=weight_decay, warmup_steps=warmup,
                          total_steps=max(total_steps, 1), scheduler=scheduler,
                          torch_adam=d.torch_adam, gradient_clipping=d.gradient_clipping,
                          betas=d.adam_betas, inference=inference)


class BatchOrder:
    """Deterministic micro-batches: epoch e is a permutation seeded by (seed, e), sharded over
    ranks. `batch(i)` is this rank's i-th micro-batch, so a resumed run picks up exactly."""

    def __init__(self, size: int, micro_batch: int, seed: int):
        rank, world_size = world()
        self.size, self.micro, self.seed = size, micro_batch, seed
        self.rank, self.world = rank, world_size
        self.per_epoch = size // (micro_batch * world_size)
        if self.per_epoch == 0:
            raise ValueError(f"{size} records cannot fill one batch of {micro_batch} x "
                             f"{world_size} ranks")
        self._epoch, self._perm = None, None

    def batch(self, index: int) -> list[int]:
        epoch, k = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1009 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g).tolist()
        start = (k * self.world + self.rank) * self.micro
        return self._perm[start:start + self.micro]


def collate(dataset, indices):
    return dataset.collator()([dataset[i] for i in indices])


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
