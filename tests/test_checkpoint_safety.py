"""Nothing lost, nothing mixed: the run-folder lock, the refusal to write over a run, the config a
resume may change, what a damaged or crafted checkpoint does (an error naming its file, no code
run) and the order in which a checkpoint reaches the disk."""
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import yaml
from trainer_support import one_torch_thread, read_jsonl, tiny_config  # noqa: F401

import rlhf.demo as demo
from rlhf.config import to_dict
from rlhf.trainers import checkpoint
from rlhf.trainers.checkpoint import (MANIFEST, CheckpointError, load_state, restore_rng,
                                      rng_state, write_manifest)
from rlhf.trainers.rl import run_rl
from rlhf.trainers.run_folder import LOCK, RunFolderError, claim_run_folder, config_changes
from rlhf.trainers.sft import run_sft
from rlhf.trainers.tracking import Tracker

# 2 optimizer steps, a checkpoint after the first: a resume redoes step 2 only
RUN = {"sft.max_steps": 2, "sft.save_every": 1, "sft.per_device_batch_size": 4,
       "sft.scheduler": "constant", "log.tensorboard": False}
WEIGHTS = "model/mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished SFT run (checkpoint step-1, the model) to copy: tests damage their copy."""
    out = tmp_path_factory.mktemp("finished")
    run_sft(tiny_config(out, RUN))
    return out


def _copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out, out / "sft" / "checkpoints" / "step-1"


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK}


# ---------------------------------------------------------------------------- the lock

def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_holder(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, {**RUN, "sft.save_every": 0})
    inside, release, results = threading.Event(), threading.Event(), []
    real_log = Tracker.log

    def log(tracker, step, metrics):  # the first run waits inside its loop
        inside.set()
        release.wait(120)
        return real_log(tracker, step, metrics)
    monkeypatch.setattr(Tracker, "log", log)
    first = threading.Thread(target=lambda: results.append(run_sft(cfg)))
    first.start()
    try:
        assert inside.wait(120)
        assert (tmp_path / "sft" / LOCK).read_text() == f"{os.getpid()}\n"
        for flags in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(RunFolderError, match=rf"sft is in use by another run \(pid "
                                                     rf"{os.getpid()}, see .*{LOCK}\).*--output"):
                run_sft(cfg, **flags)
    finally:
        release.set()
        first.join()
    assert results and [r["step"] for r in read_jsonl(tmp_path / "sft/metrics-sft.jsonl")] == [1, 2]


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
sys.stdin.read()  # held until the test closes stdin
"""


def test_a_folder_locked_by_another_process_is_refused(tmp_path):
    (tmp_path / "rl").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "rl" / LOCK)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {holder.pid},"):
            run_rl(tiny_config(tmp_path))
    finally:
        holder.stdin.close()
        holder.wait(30)
    with claim_run_folder(tmp_path / "rl"):  # free once the holder is gone
        pass


# ---------------------------------------------------------------------------- over a run

def test_a_folder_that_holds_a_run_needs_resume_or_overwrite(finished, tmp_path, caplog):
    out, _ = _copy(finished, tmp_path)
    before = _files(out)
    cfg = tiny_config(out, RUN)
    with pytest.raises(RunFolderError, match=r"sft already holds a run \(checkpoints, config.json, "
                                             r"metrics-sft.jsonl, model.safetensors\): continue it "
                                             r"with --resume .* --overwrite"):
        run_sft(cfg)
    assert _files(out) == before  # nothing written
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        run_sft(cfg, resume=True, overwrite=True)
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        run_sft(tiny_config(out, {**RUN, "sft.save_every": 0}), overwrite=True)
    assert "overwrite: deleting the earlier run's checkpoints" in caplog.text
    assert not (out / "sft" / "checkpoints").exists()  # not resumable into the new run
    assert [r["step"] for r in read_jsonl(out / "sft/metrics-sft.jsonl")] == [1, 2]


def test_rl_refuses_a_folder_that_holds_a_run_before_building_anything(tmp_path, monkeypatch):
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "metrics-rl-grpo.jsonl").write_text('{"step": 1}\n')
    monkeypatch.setattr("rlhf.trainers.rl.build_rl", lambda *a: pytest.fail("built"))
    with pytest.raises(RunFolderError, match=r"rl already holds a run \(metrics-rl-grpo.jsonl\)"):
        run_rl(tiny_config(tmp_path))


def test_the_demo_replaces_its_own_folder(tmp_path, monkeypatch):
    calls = []
    scores = {"reward": 0.0, "rule": 0.0}
    result = {"seconds": 0.0, "eval_ppl": 1.0, "eval_accuracy": 1.0, "history": [],
              "eval_before": scores, "eval_after": scores, "generation_path": "x"}
    for name in ("run_sft", "run_rm", "run_rl"):
        monkeypatch.setattr(demo, name, lambda cfg, name=name, **kw: calls.append((name, kw))
                            or result)
    demo.run_demo(demo.demo_config(str(tmp_path), True))
    assert [(name, kw["overwrite"]) for name, kw in calls] == [
        ("run_sft", True), ("run_rm", True), ("run_rl", True)]


# ---------------------------------------------------------------------------- config at resume

def test_resume_refuses_a_config_that_changes_the_run(finished, tmp_path):
    out, _ = _copy(finished, tmp_path)
    before = _files(out)
    changed = tiny_config(out, {**RUN, "seed": 7, "sft.per_device_batch_size": 8})
    with pytest.raises(RunFolderError, match=r"cannot resume .*step-1 with a changed config: "
                                             r"seed: 1234 -> 7; sft.per_device_batch_size: 4 -> 8 "
                                             r"\(these define the run"):
        run_sft(changed, resume=True)
    assert _files(out) == before


def test_resume_refuses_a_checkpoint_past_the_new_end(finished, tmp_path):
    out, step1 = _copy(finished, tmp_path)
    # the checkpoint of a longer run (sft.max_steps 1 and a checkpoint at step 1 is allowed)
    state = torch.load(step1 / "state-rank0.pt", weights_only=True)
    torch.save({**state, "micro_step": 5}, step1 / "state-rank0.pt")
    write_manifest(step1)
    with pytest.raises(RunFolderError, match=r"step-1 is past the end of the run: sft.max_steps "
                                             r"/ sft.epochs now give 2 micro-batches, it has "
                                             r"done 5"):
        run_sft(tiny_config(out, RUN), resume=True)


def test_resume_applies_a_new_learning_rate_and_saves_the_new_config(finished, tmp_path, caplog):
    out, step1 = _copy(finished, tmp_path)
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        run_sft(tiny_config(out, {**RUN, "sft.lr": 2.5e-4, "sft.max_steps": 3}), resume=True)
    assert "changed settings, applied from the resumed step on: sft.lr: 0.001 -> 0.00025; " \
           "sft.max_steps: 2 -> 3" in caplog.text
    rows = read_jsonl(out / "sft/metrics-sft.jsonl")
    # "lr" is the rate after each step (constant schedule): the checkpoint's, then the config's
    assert [(r["step"], r["lr"]) for r in rows] == [(1, 1e-3), (2, 2.5e-4), (3, 2.5e-4)]
    saved = yaml.safe_load((out / "sft/checkpoints/step-2/config.yaml").read_text())
    assert saved["sft"]["lr"] == 2.5e-4 and saved["sft"]["max_steps"] == 3


def test_config_changes_sort_each_setting(tmp_path):
    base = {"rl.algorithm": "ppo", "sft.model_path": "a", "rm.model_path": "b"}
    saved = yaml.safe_load(yaml.safe_dump(to_dict(tiny_config(tmp_path, base))))
    now = tiny_config(tmp_path / "moved", {
        **base, "rl.algorithm": "grpo", "rl.actor_lr": 5e-4, "rl.steps": 9,
        "rl.eval_every": 3, "log.log_every": 2, "sft.lr": 1.0,
        "rm.model_path": "c", "deepspeed.zero_stage": 2, "model.dtype": "bf16"})
    broken, applied, unknown = config_changes(saved, now, "rl")
    assert broken == ["deepspeed.zero_stage: 0 -> 2", "model.dtype: 'fp32' -> 'bf16'",
                      "rl.algorithm: 'ppo' -> 'grpo'", "rm.model_path: 'b' -> 'c'"]
    assert applied == ["rl.actor_lr: 0.001 -> 0.0005", "rl.eval_every: 0 -> 3",
                       "rl.steps: 2 -> 9"]
    assert unknown == []
    broken, applied, _ = config_changes(saved, now, "rm")  # rm.model_path: its own folder
    assert "rm.model_path: 'b' -> 'c'" in applied and "rl.algorithm: 'ppo' -> 'grpo'" not in broken
    del saved["rl"]["steps"]
    assert config_changes(saved, now, "rl")[2] == ["rl.steps"]  # a setting of another version


# ---------------------------------------------------------------------------- damaged, crafted

class Payload:
    """Unpickling it creates `marker`: what any code in a pickle could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_state_file_with_a_pickle_payload_is_refused_and_never_run(finished, tmp_path):
    out, step1 = _copy(finished, tmp_path)
    marker = tmp_path / "payload-ran"
    state = step1 / "state-rank0.pt"
    torch.save({"micro_step": 1, "history": [], "rng": Payload(marker)}, state)
    write_manifest(step1)  # whoever can write the file can write its checksum
    with pytest.raises(CheckpointError, match=r"step-1: state-rank0.pt holds objects other than "
                                              r"tensors and plain values; refused unread"):
        run_sft(tiny_config(out, RUN), resume=True)
    assert not marker.exists()
    torch.load(state, weights_only=False)  # the control: the payload is live
    assert marker.exists()


def test_damaged_files_are_named_even_with_a_matching_manifest(finished, tmp_path):
    out, step1 = _copy(finished, tmp_path)
    cfg = tiny_config(out, RUN)
    intact = (step1 / WEIGHTS).read_bytes()
    (step1 / WEIGHTS).write_bytes(intact[:1000])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS} has 1000 bytes, the manifest says "
                                              rf"{len(intact)} \(truncated or replaced\)"):
        run_sft(cfg, resume=True)
    write_manifest(step1)
    with pytest.raises(CheckpointError, match=rf"checkpoint .*step-1: DeepSpeed cannot load "
                                              rf"model/ \({WEIGHTS} is damaged\): \w+"):
        run_sft(cfg, resume=True)
    (step1 / WEIGHTS).write_bytes(intact)
    (step1 / "state-rank0.pt").write_bytes((step1 / "state-rank0.pt").read_bytes()[:-100])
    write_manifest(step1)
    with pytest.raises(CheckpointError, match=r"checkpoint .*step-1: cannot read state-rank0.pt "
                                              r"\(\w+"):
        run_sft(cfg, resume=True)


def test_a_manifest_covers_every_file_and_only_the_checkpoint(tmp_path):
    folder = tmp_path / "step-1"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.pt").write_bytes(b"weights")
    write_manifest(folder)
    checkpoint.verify_checkpoint(folder)
    (folder / "model" / "extra.pt").write_bytes(b"picked up by a glob")
    with pytest.raises(CheckpointError, match=r"model/extra.pt is not in its manifest"):
        checkpoint.verify_checkpoint(folder)
    (folder / "model" / "extra.pt").unlink()
    (folder / "model" / "weights.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step-1: model/weights.pt is missing"):
        checkpoint.verify_checkpoint(folder)
    (folder / MANIFEST).write_text('{"files": {"../outside": {"size": 1, "sha256": "0"}}}')
    with pytest.raises(CheckpointError, match=r"names '../outside', outside the checkpoint"):
        checkpoint.verify_checkpoint(folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest.json is unreadable"):
        checkpoint.verify_checkpoint(folder)


def test_rng_states_are_plain_values_that_restore_every_stream(tmp_path):
    generator = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # a cached gaussian is part of numpy's state
    torch.save({"rng": rng_state({"g": generator})}, tmp_path / "state.pt")
    draws = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(2).tolist(),
             torch.rand(2, generator=generator).tolist())
    restore_rng(load_state(tmp_path / "state.pt")["rng"], {"g": generator})
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(2).tolist(),
            torch.rand(2, generator=generator).tolist()) == draws


# ---------------------------------------------------------------------------- on disk

def test_a_checkpoint_is_synced_before_it_is_renamed_and_named(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    tmp, final = root / "tmp-step-3", root / "step-3"
    (tmp / "model").mkdir(parents=True)
    for name in ("model/weights.pt", "state-rank0.pt", "state-rank1.pt"):
        (tmp / name).write_bytes(name.encode())
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint._publish(root, tmp, final)
    rename = events.index(("replace", str(tmp), str(final)))
    synced = {path for kind, path, *_ in events[:rename] if kind == "fsync"}
    assert {str(tmp / n) for n in ("model/weights.pt", "state-rank0.pt", "state-rank1.pt",
                                   MANIFEST, "model")} | {str(tmp)} <= synced
    assert events[rename + 1:] == [
        ("fsync", str(root)), ("fsync", str(root / "latest.tmp")),
        ("replace", str(root / "latest.tmp"), str(root / "latest")), ("fsync", str(root))]
    manifest = json.loads((final / MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["model/weights.pt", "state-rank0.pt", "state-rank1.pt"]
    assert manifest["state-rank1.pt"]["size"] == len("state-rank1.pt")
