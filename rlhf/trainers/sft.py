"""Step 1, supervised fine-tuning: next-token loss on (prompt, response) pairs.

    for each micro-batch: loss = CE(model(prompt + response), response tokens)
                          engine.backward(loss); engine.step()
    eval: perplexity = exp(mean token NLL) on the held-out records
"""
from __future__ import annotations

import logging
import math
import time

import torch

import rlhf_kernels

from ..data import SFTDataset, phase_data_from_config
from ..engine import init_train_engine
from ..models import save_pretrained_merged
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, restore_rng, save_checkpoint
from .setup import BatchOrder, collate, ds_config, load_base, step_dir, to_device, world
from .tracking import Tracker

log = logging.getLogger("rlhf")


@torch.no_grad()
def perplexity(model, dataset, batch_size: int, device) -> float:
    """exp of the mean NLL over every label token of `dataset` (this rank's share)."""
    was_training = model.training
    model.eval()
    nll, tokens = torch.zeros((), dtype=torch.float64), 0
    for start in range(0, len(dataset), batch_size):
        batch = to_device(collate(dataset, range(start, min(start + batch_size, len(dataset)))),
                          device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        valid = labels != -100
        picked = rlhf_kernels.logprobs(logits[:, :-1], labels.clamp(min=0))
        nll -= picked[valid].double().sum().cpu()
        tokens += int(valid.sum())
    model.train(was_training)
    return math.exp(float(nll) / max(tokens, 1))


def run_sft(cfg, *, resume=False):
    """Trains step 1 and writes the model + tokenizer to step_dir(cfg, "sft"). Returns metrics."""
    s = cfg.sft
    start_time = time.time()
    torch.manual_seed(cfg.seed)
    tokenizer, model = load_base(cfg, cfg.model.name_or_path)
    phase = phase_data_from_config(cfg, "sft")
    train = SFTDataset(phase.train, tokenizer, max_seq_len=cfg.model.max_seq_len,
                       train_on_prompt=cfg.data.train_on_prompt)
    held_out = SFTDataset(phase.eval, tokenizer, max_seq_len=cfg.model.max_seq_len,
                          train_on_prompt=cfg.data.train_on_prompt)
    order = BatchOrder(len(train), s.per_device_batch_size, cfg.seed)
    micro_steps = order.per_epoch * s.epochs
    if s.max_steps > 0:
        micro_steps = min(micro_steps, s.max_steps * s.grad_accum)
    total = micro_steps // s.grad_accum
    engine = init_train_engine(model, ds_config(
        cfg, lr=s.lr, weight_decay=s.weight_decay, micro_batch=s.per_device_batch_size,
        grad_accum=s.grad_accum, warmup=s.warmup, total_steps=total, scheduler=s.scheduler))
    state = {"micro_step": 0, "history": []}
    if resume and (folder := latest_checkpoint(step_dir(cfg, "sft"))):
        state = load_checkpoint(folder, {"model": engine})
        restore_rng(state["rng"], {})
        log.info("resumed SFT from %s at micro-step %d", folder, state["micro_step"])
    tracker = Tracker(step_dir(cfg, "sft"), "sft", tensorboard=cfg.log.tensorboard,
                      wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                      progress=cfg.log.progress, total=total, history=state["history"])
    engine.train()
    running = []
    for micro in range(state["micro_step"], micro_steps):
        batch = to_device(collate(train, order.batch(micro)), engine.device)
        loss = engine(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        engine.backward(loss)
        engine.step()
        running.append(float(loss.detach()))
        if (micro + 1) % s.grad_accum:
            continue
        step = (micro + 1) // s.grad_accum
        metrics = {"loss": sum(running) / len(running), "lr": engine.get_lr()[0]}
        running = []
        if s.eval_every and step % s.eval_every == 0:
            metrics["eval_ppl"] = perplexity(engine.module, held_out,
                                             s.per_device_eval_batch_size, engine.device)
        tracker.log(step, metrics)
        if s.save_every and step % s.save_every == 0 and step < total:
            save_checkpoint(step_dir(cfg, "sft"), step, {"model": engine}, {
                "micro_step": micro + 1, "history": tracker.history, "rng": rng_state({})})
    tracker.close()
    result = {"eval_ppl": perplexity(engine.module, held_out, s.per_device_eval_batch_size,
                                     engine.device),
              "steps": total, "seconds": time.time() - start_time,
              "world_size": world()[1]}
    save_pretrained_merged(engine, step_dir(cfg, "sft"), tokenizer)
    log.info("SFT done: %s", result)
    return result
