"""The loop of the two supervised steps (SFT and the reward model).

    for micro in range(start, micro_steps):
        loss = batch_loss(engine, next micro-batch); engine.backward(loss); engine.step()
        every grad_accum micro-batches: one optimizer step -> log (+ eval, + checkpoint)
    final eval; save the model

A step differs from the other only in what `SupervisedStep` describes: its model and records,
the loss of one batch, the held-out metrics and how the model is written.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..algorithms.nonfinite import NonFiniteGuard
from ..engine import init_train_engine
from .checkpoint import load_checkpoint, restore_rng, resume_checkpoint, rng_state, save_checkpoint
from .run_folder import RunFolderError, check_resume_config, claim_run_folder, previous_run
from .setup import BatchOrder, collate, ds_config, step_dir, to_device, world
from .tracking import tracker_for

log = logging.getLogger("rlhf")

@dataclass
class SupervisedStep:
    """What one supervised step trains, on what, and how it is measured and written."""
    model: torch.nn.Module
    tokenizer: Any
    train: Any                    # indexable records with a .collator()
    held_out: Any
    data_seed: int                # of BatchOrder: a resumed run replays the same micro-batches
    # (engine, batch) -> (loss to backpropagate, per-batch metrics besides "loss")
    batch_loss: Callable[[Any, dict], tuple[torch.Tensor, dict[str, float]]]
    # (module, held-out records, batch size, device) -> {name: value}, logged as eval_<name>
    evaluate: Callable[[torch.nn.Module, Any, int, Any], dict[str, float]]
    save: Callable[[Any, Path, Any], None]  # (engine, folder, tokenizer)
    params: list[dict] | None = None  # optimizer groups; None: the engine's default grouping
    log_lr: bool = False              # an "lr" column in the step's metrics rows
    eval_before: bool = False         # measure the untrained model too, as a baseline


def held_out_batches(model, dataset, batch_size: int, device):
    """`dataset` in order, batch by batch, with `model` in eval mode (dropout off) until the
    caller is done; the mode it had is restored even if the caller stops early."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            yield to_device(collate(dataset, indices), device)
    finally:
        model.train(was_training)


def _prefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {f"eval_{k}": v for k, v in metrics.items()}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the step's micro-batches; `skipped` becomes the count
    skipped_updates (only when one was skipped: a finite run logs what it always did)."""
    skipped = sum(r.pop("skipped", False) for r in rows)
    means = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return means | ({"skipped_updates": float(skipped)} if skipped else {})


def _fresh_state() -> dict:
    return {"micro_step": 0, "history": []}


def _start_state(cfg, phase: str, out: Path, engine, micro_steps: int) -> dict:
    """The loop state of the latest checkpoint (engine and RNGs restored, config compared),
    else a fresh one."""
    folder = resume_checkpoint(out)
    if folder is None:
        (log.warning if previous_run(out) else log.info)(
            "resume: no checkpoint in %s, %s starts from step 0", out, phase)
        return _fresh_state()
    check_resume_config(folder, cfg, phase)
    state = load_checkpoint(folder, {"model": engine}, verify=False)  # resume_checkpoint did
    if state["micro_step"] > micro_steps:
        raise RunFolderError(f"checkpoint {folder} is past the end of the run: {phase}.max_steps "
                             f"/ {phase}.epochs now give {micro_steps} micro-batches, it has "
                             f"done {state['micro_step']}")
    restore_rng(state["rng"], {})
    log.info("resumed %s from %s at micro-step %d", phase, folder, state["micro_step"])
    return state


def train_supervised(cfg, phase: str, build: Callable[[Any], SupervisedStep], *,
                     resume: bool = False, overwrite: bool = False) -> tuple[dict, dict | None]:
    """Trains what `build(cfg)` describes with the settings of cfg.<phase> and writes it to
    step_dir(cfg, phase), which it holds locked meanwhile (run_folder.py). A folder that holds
    a run is continued with `resume` (from its latest checkpoint) or replaced with `overwrite`;
    otherwise it is refused.

    Returns (result, before): result = {"eval_<name>": final held-out metrics..., "steps",
    "seconds", "world_size"}; before = the held-out metrics before training (eval_ prefixed),
    or None unless the task asks for them."""
    with claim_run_folder(step_dir(cfg, phase), resume=resume, overwrite=overwrite):
        return _train(cfg, phase, build, resume)


def _train(cfg, phase: str, build: Callable[[Any], SupervisedStep], resume: bool):
    s, out = getattr(cfg, phase), step_dir(cfg, phase)
    started = time.time()
    torch.manual_seed(cfg.seed)  # model initialisation is the same whatever ran before
    task = build(cfg)
    order = BatchOrder(len(task.train), s.per_device_batch_size, task.data_seed)
    micro_steps = order.per_epoch * s.epochs
    if s.max_steps > 0:
        micro_steps = min(micro_steps, s.max_steps * s.grad_accum)
    total = micro_steps // s.grad_accum
    engine = init_train_engine(task.model, ds_config(
        cfg, lr=s.lr, weight_decay=s.weight_decay, micro_batch=s.per_device_batch_size,
        grad_accum=s.grad_accum, warmup=s.warmup, total_steps=total, scheduler=s.scheduler,
        warmup_key=f"{phase}.warmup"),
        params=task.params)
    state = _start_state(cfg, phase, out, engine, micro_steps) if resume else _fresh_state()
    tracker = tracker_for(cfg, out, phase, total=total, history=state["history"])

    def evaluate() -> dict[str, float]:
        return _prefixed(task.evaluate(engine.module, task.held_out,
                                       s.per_device_eval_batch_size, engine.device))

    engine.train()
    before = evaluate() if task.eval_before else None
    guard = NonFiniteGuard(cfg.max_skipped_steps, "max_skipped_steps")
    running = []
    for micro in range(state["micro_step"], micro_steps):
        batch = to_device(collate(task.train, order.batch(micro)), engine.device)
        loss, extra = task.batch_loss(engine, batch)
        skipped = not guard.backward_and_step(engine, loss, phase)
        running.append({"loss": float(loss.detach()), **extra, "skipped": skipped})
        if (micro + 1) % s.grad_accum:
            continue
        step = (micro + 1) // s.grad_accum
        metrics, running = _mean(running), []
        if task.log_lr:  # read after the step: the rate the scheduler set for the next one
            metrics["lr"] = engine.get_lr()[0]
        if s.eval_every and step % s.eval_every == 0:
            metrics.update(evaluate())
        tracker.log(step, metrics)
        if s.save_every and step % s.save_every == 0 and step < total:
            tracker.flush()  # the checkpoint's history must hold every step up to this one
            save_checkpoint(out, step, {"model": engine}, {
                "micro_step": micro + 1, "history": tracker.history, "rng": rng_state({})},
                config=cfg)
    tracker.close()
    after = evaluate()
    task.save(engine, out, task.tokenizer)
    result = {**after, "steps": total, "seconds": time.time() - started,
              "world_size": world()[1]}
    log.info("%s done: %s", phase, result)
    return result, before
