"""Checkpoints written atomically (temp folder + rename) and an exact resume.

    <output>/checkpoints/step-<N>/          one finished checkpoint per save
        <engine name>/...                   DeepSpeed's own files (weights, optimizer, scheduler)
        state-rank<r>.pt                    loop position, RNG states, metric history
    <output>/checkpoints/latest             the name of the newest finished checkpoint

A crash while saving leaves a `tmp-step-<N>` folder that is never read. Resume restores the
engines, every RNG the loop draws from and the position in the data, so that on CPU in fp32
the next steps' losses equal those of an uninterrupted run.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..models.export import is_main_process


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "generators": {name: g.get_state() for name, g in generators.items()}}


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def save_checkpoint(output: str | Path, step: int, engines: dict, state: dict) -> Path:
    """Collective: every rank writes its part into a temp folder, rank 0 renames it."""
    root = Path(output) / "checkpoints"
    final, tmp = root / f"step-{step}", root / f"tmp-step-{step}"
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=name)
    torch.save(state, tmp / f"state-rank{_rank()}.pt")
    _barrier()
    if is_main_process():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")  # the pointer moves only once the folder is whole
    _barrier()
    return final


def latest_checkpoint(output: str | Path) -> Path | None:
    pointer = Path(output) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def load_checkpoint(folder: str | Path, engines: dict) -> dict:
    """Loads the engines in place; returns this rank's loop state."""
    folder = Path(folder)
    for name, engine in engines.items():
        path, _ = engine.load_checkpoint(str(folder), tag=name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"checkpoint {folder} has no files for {name!r}")
    return torch.load(folder / f"state-rank{_rank()}.pt", weights_only=False)
