"""Who may write into a step's run folder, and with which config a run there may be resumed.

A step (sft, rm, rl) writes one folder: metrics, TensorBoard events, checkpoints, the model.
- `claim_run_folder` holds an exclusive lock (flock on `run.lock`, which names the holder's
  pid) for the whole run, so that two runs never interleave their metrics or checkpoints; and
  refuses a folder that already holds a run unless the run is resumed (continued) or
  overwritten (its metrics, events and checkpoints deleted first, the model replaced at the end).
- `check_resume_config` compares the checkpoint's config with the current one: settings that
  define the run must be equal; those in MAY_CHANGE are applied from the resumed step on.

Multi-rank: rank 0 locks and checks, the others wait for its verdict (one broadcast).
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import yaml

from ..config import to_dict
from ..models.export import is_main_process
from .checkpoint import CONFIG, broadcast

log = logging.getLogger("rlhf")
LOCK = "run.lock"
# what a run leaves in its folder: any of these means the folder holds a run
RUN_FILES = ("metrics-*.jsonl", "checkpoints", "logs", "config.json", "*.safetensors", "actor",
             "actor_ema")
# deleted by overwrite: what the new run might not rewrite and a resume or a reader would take
# for the new run's own (the model files it does rewrite, at its end)
CLEARED = ("metrics-*.jsonl", "checkpoints", "logs", "actor", "actor_ema")
# settings of the step's own section that a resume may change: its length, its intervals, its
# learning-rate schedule (the config's wins over the checkpoint's: checkpoint.py) and eval batch
MAY_CHANGE = {"max_steps", "epochs", "steps", "eval_every", "save_every", "lr", "head_lr_scale",
              "actor_lr", "critic_lr", "warmup", "scheduler", "per_device_eval_batch_size",
              "reward_timeout", "model_path"}
# the models a step starts from, besides model.*: a resume must keep them
INPUTS = {"sft": (), "rm": ("sft.model_path",), "rl": ("sft.model_path", "rm.model_path")}


class RunFolderError(RuntimeError):
    """A run folder that cannot be written (locked, holds a run) or resumed (changed config)."""


def previous_run(folder: str | Path) -> list[str]:
    """The names in `folder` that an earlier run left (empty: the folder holds no run)."""
    folder = Path(folder)
    return sorted({p.name for pattern in RUN_FILES for p in folder.glob(pattern)})


def _lock(folder: Path) -> int:
    """An open descriptor of folder/run.lock holding its exclusive flock (the kernel drops it
    when the process ends, however it ends)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderError(f"{folder} is in use by another run (pid {holder}, see {path}): "
                             "wait for it to end, or write elsewhere with --output") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _clear(folder: Path, found: list[str]) -> None:
    log.warning("overwrite: deleting the earlier run's %s in %s", ", ".join(found), folder)
    for pattern in CLEARED:
        for path in folder.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _check(folder: Path, resume: bool, overwrite: bool) -> None:
    found = previous_run(folder)
    if not found or resume:
        return
    if not overwrite:
        raise RunFolderError(f"{folder} already holds a run ({', '.join(found)}): continue it "
                             "with --resume (resume=True), replace it with --overwrite "
                             "(overwrite=True), or choose another --output")
    _clear(folder, found)


@contextmanager
def claim_run_folder(folder: str | Path, *, resume: bool = False, overwrite: bool = False):
    """Holds `folder` for the run inside the `with`: locked, and checked to hold no other run
    (see the module's doc). Collective when torch.distributed runs."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues the run "
                         "in the folder, --overwrite deletes it")
    from ..engine import init_distributed
    init_distributed()  # the ranks agree through torch.distributed (started here if not yet)
    folder, fd, error = Path(folder), None, None
    if is_main_process():
        try:
            fd = _lock(folder)
            _check(folder, resume, overwrite)
        except RunFolderError as err:
            error = str(err)
    error = broadcast(error)
    try:
        if error is not None:
            raise RunFolderError(error)
        yield folder
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock; the file stays (unlinking it would race)


# ---------------------------------------------------------------------------- resume config

def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_by(key: str, section: str) -> bool:
    """Whether step `section` reads setting `key` (the others may change freely: log.*, output,
    the other steps' sections, max_skipped_steps)."""
    head = key.rpartition(".")[0]
    return key == "seed" or head in ("model", "data", "deepspeed", section) or \
        key in INPUTS[section]


def config_changes(saved: dict, cfg, section: str) -> tuple[list[str], list[str], list[str]]:
    """(changes that break the run, changes applied, keys in only one of the configs) between
    a checkpoint's saved config (a nested dict) and `cfg`, for step `section`."""
    old = _flat(saved)
    new = _flat(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))  # the types a saved one has
    broken, applied, unknown = [], [], []
    for key in sorted(set(old) | set(new)):
        if not _read_by(key, section):
            continue
        if key not in old or key not in new:
            unknown.append(key)
        elif old[key] != new[key]:
            change = f"{key}: {old[key]!r} -> {new[key]!r}"
            own = key.rpartition(".")[0] == section
            (applied if own and key.rpartition(".")[2] in MAY_CHANGE else broken).append(change)
    return broken, applied, unknown


def check_resume_config(folder: Path, cfg, section: str) -> None:
    """Refuses a resume whose config changes what defines the run (RunFolderError listing each
    `key: saved -> now`); warns about the changes it applies."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        log.warning("checkpoint %s has no %s: the config cannot be compared", folder, CONFIG)
        return
    broken, applied, unknown = config_changes(yaml.safe_load(path.read_text()) or {}, cfg,
                                              section)
    if broken:
        raise RunFolderError(f"cannot resume {folder} with a changed config: {'; '.join(broken)} "
                             f"(these define the run: resume with the values in {path}, or start "
                             "again with --overwrite)")
    if not is_main_process():
        return
    if applied:
        log.warning("resuming %s with changed settings, applied from the resumed step on: %s "
                    "(learning rates: the config's win over the checkpoint's scheduler)", folder,
                    "; ".join(applied))
    if unknown:
        log.warning("settings in only one of the checkpoint's and the current config (another "
                    "version): %s", ", ".join(unknown))
