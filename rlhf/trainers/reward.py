"""Step 2, the reward model: a value head on the SFT model, trained on preference pairs.

    scores = v_head(h_last) at the last real token of prompt + answer
    loss   = -log sigmoid(score_chosen - score_rejected)
    eval:  accuracy = share of held-out pairs with score_chosen > score_rejected
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data import PairDataset, phase_data_from_config
from ..models import ValueModel, pairwise_loss
from .setup import load_base, step_dir
from .supervised import SupervisedStep, held_out_batches, train_supervised


def pair_scores(model, batch):
    """(chosen scores [B], rejected scores [B]) from one [2B, T] pair batch."""
    values = model(batch["input_ids"], batch["attention_mask"])
    scores = values.gather(1, batch["last_index"][:, None])[:, 0]
    return scores.chunk(2)


@torch.no_grad()
def pair_accuracy(model, dataset, batch_size: int, device) -> dict[str, float]:
    """Share of pairs ranked right, and the mean score margin chosen - rejected."""
    wins, margin, n = 0.0, 0.0, 0
    for batch in held_out_batches(model, dataset, batch_size, device):
        chosen, rejected = pair_scores(model, batch)
        wins += float((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
        n += chosen.numel()
    return {"accuracy": wins / max(n, 1), "margin": margin / max(n, 1)}


def rm_init_path(cfg) -> Path | str:
    """The SFT model when step 1 wrote one (as InstructGPT does; it also shares the tokenizer),
    else cfg.model.name_or_path."""
    sft = step_dir(cfg, "sft")
    return sft if (sft / "config.json").exists() else cfg.model.name_or_path


def _pairwise_loss(engine, batch):
    out = pairwise_loss(*pair_scores(engine, batch))
    return out.loss, {"accuracy": float(out.accuracy)}


def _param_groups(model: ValueModel, s) -> list[dict]:
    # a fresh head on a pretrained backbone: it may learn at a larger rate (head_lr_scale)
    body = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": body, "weight_decay": s.weight_decay},
              {"params": list(model.v_head.parameters()), "weight_decay": 0.0,
               "lr": s.lr * s.head_lr_scale}]
    return [g for g in groups if g["params"]]


def _rm_step(cfg) -> SupervisedStep:
    tokenizer, lm = load_base(cfg, rm_init_path(cfg))
    model = ValueModel.from_causal_lm(lm, gradient_checkpointing=cfg.model.gradient_checkpointing)
    phase = phase_data_from_config(cfg, "rm")
    train, held_out = (PairDataset(records, tokenizer, max_seq_len=cfg.model.max_seq_len)
                       for records in (phase.train, phase.eval))
    return SupervisedStep(
        model=model, tokenizer=tokenizer, train=train, held_out=held_out,
        data_seed=cfg.seed + 1,  # a shuffle of its own, not step 1's
        batch_loss=_pairwise_loss, evaluate=pair_accuracy,
        save=lambda engine, folder, tok: engine.module.save(folder, tok),
        params=_param_groups(model, cfg.rm), eval_before=True)


def run_rm(cfg, *, resume=False, overwrite=False):
    """Trains step 2 and writes the reward model to step_dir(cfg, "rm"). Returns metrics
    (eval_accuracy_before, eval_accuracy, eval_margin, steps, seconds, world_size).

    Initialised from rm_init_path(cfg)."""
    result, before = train_supervised(cfg, "rm", _rm_step, resume=resume,
                                      overwrite=overwrite)
    return {"eval_accuracy_before": before["eval_accuracy"], **result}
