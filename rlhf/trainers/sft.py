"""Step 1, supervised fine-tuning: next-token loss on (prompt, response) pairs.

    for each micro-batch: loss = CE(model(prompt + response), response tokens)
                          engine.backward(loss); engine.step()
    eval: perplexity = exp(mean token NLL) on the held-out records
"""
from __future__ import annotations

import math

import torch

import rlhf_kernels

from ..data import SFTDataset, phase_data_from_config
from ..data.tokenized import IGNORE_INDEX
from ..models import save_pretrained_merged
from .setup import load_base
from .supervised import SupervisedStep, held_out_batches, train_supervised


@torch.no_grad()
def perplexity(model, dataset, batch_size: int, device) -> float:
    """exp of the mean NLL over every label token of `dataset` (this rank's share)."""
    nll, tokens = torch.zeros((), dtype=torch.float64), 0
    for batch in held_out_batches(model, dataset, batch_size, device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        valid = labels != IGNORE_INDEX
        picked = rlhf_kernels.logprobs(logits[:, :-1], labels.clamp(min=0))
        nll -= picked[valid].double().sum().cpu()
        tokens += int(valid.sum())
    return math.exp(float(nll) / max(tokens, 1))


def _next_token_loss(engine, batch):
    # the model shifts the labels itself; prompt and padding tokens carry IGNORE_INDEX
    return engine(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss, {}


def _sft_step(cfg) -> SupervisedStep:
    tokenizer, model = load_base(cfg, cfg.model.name_or_path)
    phase = phase_data_from_config(cfg, "sft")
    train, held_out = (SFTDataset(records, tokenizer, max_seq_len=cfg.model.max_seq_len,
                                  train_on_prompt=cfg.data.train_on_prompt)
                       for records in (phase.train, phase.eval))
    return SupervisedStep(
        model=model, tokenizer=tokenizer, train=train, held_out=held_out, data_seed=cfg.seed,
        batch_loss=_next_token_loss,
        evaluate=lambda *args: {"ppl": perplexity(*args)},
        save=save_pretrained_merged, log_lr=True)


def run_sft(cfg, *, resume=False, overwrite=False):
    """Trains step 1 and writes the model + tokenizer to step_dir(cfg, "sft"). Returns metrics
    (eval_ppl, steps, seconds, world_size)."""
    result, _ = train_supervised(cfg, "sft", _sft_step, resume=resume,
                                 overwrite=overwrite)
    return result
