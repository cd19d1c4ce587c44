"""Checkpoints: written atomically and durably, verified before a resume, exact when resumed.

    <output>/checkpoints/step-<N>/          one finished checkpoint per save
        <engine name>/...                   DeepSpeed's own files (weights, optimizer, scheduler)
        state-rank<r>.pt                    loop position, RNG states, metric history
        config.yaml                         the run's config at the save (compared at resume)
        manifest.json                       size and sha256 of every other file
    <output>/checkpoints/latest             the name of the newest finished checkpoint

Save: every rank writes into `tmp-step-<N>`; rank 0 hashes and fsyncs every file, writes the
manifest, fsyncs the folder, renames it to `step-<N>`, fsyncs the parent, then moves `latest`.
A crash at any point leaves the checkpoint `latest` names whole, and at most a temp folder
that is never read.

Resume (`latest_checkpoint`): the folder `latest` names if its manifest verifies; otherwise
(a pointer to a missing folder, garbage in it, a file that fails its check) the newest
`step-<N>` that verifies, with a warning; when checkpoints exist but none verifies, an error,
as a restart from step 0 would overwrite them. On CPU in fp32 the resumed steps' losses equal
those of an uninterrupted run.

A checkpoint is code. Our state files are read with torch.load(weights_only=True): tensors and
plain values only. DeepSpeed's own files are pickles that DeepSpeed unpickles in full
(weights_only=False): a crafted file runs code at resume. The manifest detects damage, not
tampering (whoever can rewrite a file can rewrite the manifest): resume only trusted folders.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..models.export import is_main_process

log = logging.getLogger("rlhf")
MANIFEST, CONFIG, POINTER = "manifest.json", "config.yaml", "latest"
STEP_NAME = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed; the message names the folder and the file."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast(value):
    """Rank 0's `value` on every rank (a picklable object; the value itself with one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------- RNG states

def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Every RNG the loop draws from, as tensors and plain values (weights_only-loadable)."""
    numpy_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(),  # (int, tuple of ints, float | None)
            "numpy": {"bit_generator": numpy_state["bit_generator"],
                      "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                      "pos": int(numpy_state["state"]["pos"]),
                      "has_gauss": int(numpy_state["has_gauss"]),
                      "gauss": float(numpy_state["gauss"])},
            "torch": torch.get_rng_state(),
            "generators": {name: g.get_state() for name, g in generators.items()}}


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"],
                         "gauss": n["gauss"], "state": {"key": n["key"].numpy().astype(np.uint32),
                                                        "pos": n["pos"]}})
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


# ---------------------------------------------------------------------------- durable files

def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path, sync: bool) -> dict:
    """{"size", "sha256"} of a file; with `sync`, its data is on disk when this returns."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
        if sync:
            os.fsync(fh.fileno())
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_manifest(folder: Path) -> dict:
    """Hashes and fsyncs every file of `folder` (every rank's, on a shared file system) and its
    sub-folders, then writes manifest.json: relative path -> size, sha256."""
    files = {p.relative_to(folder).as_posix(): _digest(p, sync=True) for p in _files(folder)}
    for sub in sorted({p.parent for p in folder.rglob("*") if p.is_file()}, reverse=True):
        _fsync_dir(sub)  # the entries of the files just synced
    manifest = {"format": 1, "files": files}
    _write_synced(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST}: it was not finished, "
                              "or was written by a version without manifests")
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        listed = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is unreadable ({err})") from err
    outside = [k for k in listed if Path(k).is_absolute() or ".." in Path(k).parts]
    if outside:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} names {outside[0]!r}, outside "
                              "the checkpoint")
    return listed


def verify_checkpoint(folder: str | Path) -> None:
    """Every file the manifest lists, with its size and sha256, and no other file (a loader
    could pick it up); raises CheckpointError naming the first file that differs."""
    folder = Path(folder)
    listed = _read_manifest(folder)
    for path in _files(folder):
        if path.relative_to(folder).as_posix() not in listed:
            raise CheckpointError(f"checkpoint {folder}: {path.relative_to(folder).as_posix()} "
                                  "is not in its manifest (added after the save)")
    for name, (size, sha) in listed.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {folder}: {name} has {path.stat().st_size} bytes, "
                                  f"the manifest says {size} (truncated or replaced)")
        if _digest(path, sync=False)["sha256"] != sha:
            raise CheckpointError(f"checkpoint {folder}: {name} fails its sha256 check (its bytes "
                                  "changed after the save)")


# ---------------------------------------------------------------------------- save

def _publish(root: Path, tmp: Path, final: Path) -> None:
    """tmp-step-N -> step-N, then `latest`: each move only once what it exposes is on disk."""
    write_manifest(tmp)
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a save of this step by an earlier process
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_synced(root / f"{POINTER}.tmp", final.name)
    os.replace(root / f"{POINTER}.tmp", root / POINTER)
    _fsync_dir(root)


def save_checkpoint(output: str | Path, step: int, engines: dict, state: dict,
                    config=None) -> Path:
    """Collective: every rank writes its part into a temp folder, rank 0 publishes it.
    `state` holds tensors and plain values only (it is loaded with weights_only=True);
    `config` (a RunConfig) is saved beside it for the resume's comparison."""
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
        if config is not None:
            from ..config import save_config
            save_config(config, tmp / CONFIG)
        _publish(root, tmp, final)
    _barrier()
    return final


# ---------------------------------------------------------------------------- find

def _step_folders(root: Path) -> list[Path]:
    """step-<N> folders, newest first (temp folders are never candidates)."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir()
             and (m := STEP_NAME.fullmatch(p.name))] if root.is_dir() else []
    return [p for _, p in sorted(found, reverse=True)]


def _pointed(root: Path) -> tuple[Path | None, str]:
    """(the folder `latest` names, "") or (None, why it names none)."""
    pointer = root / POINTER
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, f"{pointer} is missing or unreadable"
    if not STEP_NAME.fullmatch(name):
        return None, f"{pointer} holds {name[:40]!r}, not a checkpoint name"
    if not (root / name).is_dir():
        return None, f"{pointer} names {name}, which does not exist"
    return root / name, ""


def latest_checkpoint(output: str | Path) -> Path | None:
    """The checkpoint a resume continues from (verified), None when none was ever finished.
    Raises CheckpointError when checkpoints exist but none verifies."""
    root = Path(output) / "checkpoints"
    candidates = _step_folders(root)
    if not candidates and not (root / POINTER).exists():
        return None
    named, problem = _pointed(root)
    if named is not None:
        try:
            verify_checkpoint(named)
            return named
        except CheckpointError as err:
            problem = str(err)
    failures = [problem]
    for folder in candidates:
        if folder == named:
            continue
        try:
            verify_checkpoint(folder)
        except CheckpointError as err:
            failures.append(str(err))
            continue
        log.warning("%s; resuming from %s, the newest checkpoint that verifies", problem, folder)
        return folder
    raise CheckpointError(f"no checkpoint in {root} can be resumed ({'; '.join(failures)}); a "
                          "restart from step 0 would overwrite them: restore one, or start "
                          "again with --overwrite (overwrite=True), which deletes them")


def resume_checkpoint(output: str | Path) -> Path | None:
    """latest_checkpoint as rank 0 finds it, on every rank (one verification, one choice)."""
    found, error = None, None
    if is_main_process():
        try:
            found = latest_checkpoint(output)
        except CheckpointError as err:
            error = str(err)
    found, error = broadcast((None if found is None else str(found), error))
    if error is not None:
        raise CheckpointError(error)
    return None if found is None else Path(found)


# ---------------------------------------------------------------------------- load

def load_state(path: Path) -> dict:
    """A state-rank<r>.pt, loaded with weights_only=True: a pickle that would build any other
    object (and so could run code) is refused before anything of it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} holds objects other than "
                              f"tensors and plain values; refused unread ({err})") from err
    except Exception as err:  # EOFError, zip errors, OSError: a damaged file
        raise CheckpointError(f"checkpoint {path.parent}: cannot read {path.name} "
                              f"({type(err).__name__}: {err})") from err


def _keep_config_schedule(engine, base_lrs: list[float]) -> None:
    """The learning rates of the config win over the checkpoint's: DeepSpeed restored the
    scheduler's base rates and the optimizer's current ones; the step count stays restored."""
    sched = getattr(engine, "lr_scheduler", None)
    if sched is None or not hasattr(sched, "lr_lambdas"):
        return
    sched.base_lrs = list(base_lrs)
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(base_lrs, sched.lr_lambdas)]
    for group, base, lr in zip(sched.optimizer.param_groups, base_lrs, lrs):
        group["initial_lr"], group["lr"] = base, lr
    sched._last_lr = lrs


def _damaged(folder: Path, name: str) -> str:
    """The first file of engine `name` that is not a whole zip archive (torch.save's format,
    CRC-checked without unpickling anything), as " (<file> is damaged)", else ""."""
    for path in sorted((folder / name).rglob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is None:
                    continue
        except (zipfile.BadZipFile, OSError, EOFError):
            pass
        return f" ({path.relative_to(folder).as_posix()} is damaged)"
    return ""


def _load_engine(folder: Path, name: str, engine) -> None:
    sched = getattr(engine, "lr_scheduler", None)
    base_lrs = list(sched.base_lrs) if sched is not None else []
    try:
        path, _ = engine.load_checkpoint(str(folder), tag=name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except Exception as err:  # DeepSpeed's bare AssertionError / EOFError / OSError
        raise CheckpointError(f"checkpoint {folder}: DeepSpeed cannot load {name}/"
                              f"{_damaged(folder, name)}: {type(err).__name__}: {err}") from err
    if path is None:
        raise CheckpointError(f"checkpoint {folder} has no files for {name!r}")
    _keep_config_schedule(engine, base_lrs)


def load_checkpoint(folder: str | Path, engines: dict, *, verify: bool = True) -> dict:
    """Loads the engines in place (learning rates: the current config's, see
    `_keep_config_schedule`); returns this rank's loop state. `verify=False` when
    latest_checkpoint has just verified the folder."""
    folder = Path(folder)
    if verify:
        verify_checkpoint(folder)
    for name, engine in engines.items():
        _load_engine(folder, name, engine)
    return load_state(folder / f"state-rank{_rank()}.pt")
