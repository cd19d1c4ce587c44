"""Step 2, the reward model: a value head on the SFT model, trained on preference pairs.

    scores = v_head(h_last) at the last real token of prompt + answer
    loss   = -log sigmoid(score_chosen - score_rejected)
    eval:  accuracy = share of held-out pairs with score_chosen > score_rejected
"""
from __future__ import annotations

import logging
import time

import torch

from ..data import PairDataset, phase_data_from_config
from ..engine import init_train_engine
from ..models import ValueModel, pairwise_loss
from .checkpoint import latest_checkpoint, load_checkpoint, restore_rng, rng_state, save_checkpoint
from .setup import BatchOrder, collate, ds_config, load_base, step_dir, to_device, world
from .tracking import Tracker

log = logging.getLogger("rlhf")


def pair_scores(model, batch):
    """(chosen scores [B], rejected scores [B]) from one [2B, T] pair batch."""
    values = model(batch["input_ids"], batch["attention_mask"])
    scores = values.gather(1, batch["last_index"][:, None])[:, 0]
    return scores.chunk(2)


@torch.no_grad()
def pair_accuracy(model, dataset, batch_size: int, device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    wins, margin, n = 0.0, 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = to_device(collate(dataset, range(start, min(start + batch_size, len(dataset)))),
                          device)
        chosen, rejected = pair_scores(model, batch)
        wins += float((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
        n += chosen.numel()
    model.train(was_training)
    return {"accuracy": wins / max(n, 1), "margin": margin / max(n, 1)}


def run_rm(cfg, *, resume=False):
    """Trains step 2 and writes the reward model to step_dir(cfg, "rm"). Returns metrics.

    Initialised from the SFT model when step 1 wrote one (as InstructGPT does; it also shares
    the tokenizer), else from cfg.model.name_or_path."""
    s = cfg.rm
    start_time = time.time()
    torch.manual_seed(cfg.seed)
    sft = step_dir(cfg, "sft")
    base = sft if (sft / "config.json").exists() else cfg.model.name_or_path
    tokenizer, lm = load_base(cfg, base)
    model = ValueModel.from_causal_lm(lm, gradient_checkpointing=cfg.model.gradient_checkpointing)
    phase = phase_data_from_config(cfg, "rm")
    train = PairDataset(phase.train, tokenizer, max_seq_len=cfg.model.max_seq_len)
    held_out = PairDataset(phase.eval, tokenizer, max_seq_len=cfg.model.max_seq_len)
    order = BatchOrder(len(train), s.per_device_batch_size, cfg.seed + 1)
    micro_steps = order.per_epoch * s.epochs
    if s.max_steps > 0:
        micro_steps = min(micro_steps, s.max_steps * s.grad_accum)
    total = micro_steps // s.grad_accum
    # a fresh head on a pretrained backbone: it may learn at a larger rate (head_lr_scale)
    head = list(model.v_head.parameters())
    body = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": body, "weight_decay": s.weight_decay},
              {"params": head, "weight_decay": 0.0, "lr": s.lr * s.head_lr_scale}]
    engine = init_train_engine(model, ds_config(
        cfg, lr=s.lr, weight_decay=s.weight_decay, micro_batch=s.per_device_batch_size,
        grad_accum=s.grad_accum, warmup=s.warmup, total_steps=total, scheduler=s.scheduler),
        params=[g for g in groups if g["params"]])
    out = step_dir(cfg, "rm")
    state = {"micro_step": 0, "history": []}
    if resume and (folder := latest_checkpoint(out)):
        state = load_checkpoint(folder, {"model": engine})
        restore_rng(state["rng"], {})
        log.info("resumed the reward model from %s at micro-step %d", folder, state["micro_step"])
    tracker = Tracker(out, "rm", tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                      wandb_project=cfg.log.wandb_project, progress=cfg.log.progress,
                      total=total, history=state["history"])
    engine.train()
    before = pair_accuracy(engine.module, held_out, s.per_device_eval_batch_size, engine.device)
    running = []
    for micro in range(state["micro_step"], micro_steps):
        batch = to_device(collate(train, order.batch(micro)), engine.device)
        chosen, rejected = pair_scores(engine, batch)
        out_loss = pairwise_loss(chosen, rejected)
        engine.backward(out_loss.loss)
        engine.step()
        running.append((float(out_loss.loss.detach()), float(out_loss.accuracy)))
        if (micro + 1) % s.grad_accum:
            continue
        step = (micro + 1) // s.grad_accum
        metrics = {"loss": sum(r[0] for r in running) / len(running),
                   "accuracy": sum(r[1] for r in running) / len(running)}
        running = []
        if s.eval_every and step % s.eval_every == 0:
            metrics.update({f"eval_{k}": v for k, v in pair_accuracy(
                engine.module, held_out, s.per_device_eval_batch_size, engine.device).items()})
        tracker.log(step, metrics)
        if s.save_every and step % s.save_every == 0 and step < total:
            save_checkpoint(out, step, {"model": engine}, {
                "micro_step": micro + 1, "history": tracker.history, "rng": rng_state({})})
    tracker.close()
    after = pair_accuracy(engine.module, held_out, s.per_device_eval_batch_size, engine.device)
    engine.module.save(out, tokenizer)
    result = {"eval_accuracy_before": before["accuracy"], "eval_accuracy": after["accuracy"],
              "eval_margin": after["margin"], "steps": total,
              "seconds": time.time() - start_time, "world_size": world()[1]}
    log.info("reward model done: %s", result)
    return result
