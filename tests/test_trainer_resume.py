"""Checkpoints and resume: a run killed after a checkpoint and resumed gives the same steps, final
metrics and weights as a run that never stopped (CPU, fp32); a crash while a checkpoint is
written leaves a temp folder that is never read, wherever a SIGKILL lands; a broken `latest`
pointer or a damaged checkpoint falls back to the newest checkpoint that verifies."""
import json
import logging
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trainer_support import (REPO_ROOT, learning_metrics, one_torch_thread,  # noqa: F401
                             read_jsonl, subprocess_env, tiny_config)

from rlhf.trainers.checkpoint import (MANIFEST, CheckpointError, latest_checkpoint,
                                      verify_checkpoint, write_manifest)
from rlhf.trainers.reward import run_rm
from rlhf.trainers.rl import run_rl
from rlhf.trainers.sft import run_sft
from rlhf.trainers.tracking import Tracker

RUNNERS = {"sft": run_sft, "rm": run_rm, "rl": run_rl}
# 4 optimizer steps each, with what a resume must restore: gradient accumulation inside a step,
# warm-up + cosine schedule, several RL minibatches, the EMA and the mixed SFT (ptx) batches
STEPS = 4
RUNS = {
    "sft": {"sft.max_steps": STEPS, "sft.grad_accum": 2, "sft.per_device_batch_size": 4,
            "sft.warmup": 1},
    "rm": {"rm.max_steps": STEPS, "rm.grad_accum": 2, "rm.per_device_batch_size": 4,
           "rm.warmup": 1},
    "rl": {"rl.steps": STEPS, "rl.train_batch_size": 2, "rl.warmup": 1, "rl.enable_ema": True,
           "rl.ptx": True, "rl.ptx_coef": 0.5},
}
WEIGHTS = {"sft": ["sft/model.safetensors"],
           "rm": ["rm/model.safetensors", "rm/value_head.safetensors"],
           "rl": ["rl/actor/model.safetensors", "rl/actor_ema/model.safetensors"]}
FINAL_METRIC = {"sft": "eval_ppl", "rm": "eval_accuracy", "rl": "eval_after"}


class Killed(Exception):
    """Stands for the process being killed at a chosen point."""


class StepLog:
    """Records the steps a run logs; raises Killed instead of logging step `kill_at` (after that
    optimizer step, before the checkpoint that would follow it)."""

    def __init__(self):
        self.steps, self.kill_at = [], None

    def wrap(self, log):
        def recorded(tracker, step, metrics):
            if step == self.kill_at:
                raise Killed(f"before logging step {step}")
            self.steps.append(step)
            return log(tracker, step, metrics)
        return recorded

    def restart(self):
        self.steps, self.kill_at = [], None


@pytest.fixture
def step_log(monkeypatch):
    log = StepLog()
    monkeypatch.setattr(Tracker, "log", log.wrap(Tracker.log))
    return log


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """SFT and reward models trained once, as the later steps' inputs."""
    out = tmp_path_factory.mktemp("prepared")
    cfg = tiny_config(out)
    run_sft(cfg)
    run_rm(cfg)
    return {"sft": {}, "rm": {"sft.model_path": str(out / "sft")},
            "rl": {"sft.model_path": str(out / "sft"), "rm.model_path": str(out / "rm")}}


def _config(step, prepared, output, **extra):
    return tiny_config(output, {**prepared[step], **RUNS[step], **extra})


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """step -> (result, output folder) of a run without checkpoints, made once per step."""
    done = {}

    def run(step):
        if step not in done:
            out = tmp_path_factory.mktemp(f"uninterrupted-{step}")
            done[step] = RUNNERS[step](_config(step, prepared, out)), out
        return done[step]
    return run


METRICS = {"sft": "sft/metrics-sft.jsonl", "rm": "rm/metrics-rm.jsonl",
           "rl": "rl/metrics-rl-ppo.jsonl"}


def _assert_same_run(step, result, output, reference, reference_output):
    """Same metrics file (the killed run's rows, then the resumed run's), final metric, weights."""
    rows = learning_metrics(read_jsonl(output / METRICS[step]))
    expected = learning_metrics(read_jsonl(reference_output / METRICS[step]))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert row == pytest.approx(want, rel=0, abs=1e-6)
    assert result[FINAL_METRIC[step]] == pytest.approx(reference[FINAL_METRIC[step]], abs=1e-6)
    for name in WEIGHTS[step]:
        got, want = load_file(output / name), load_file(reference_output / name)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=f"{name} {key}")


@pytest.mark.parametrize("step", ["sft", "rm", "rl"])
def test_resume_after_a_kill_matches_the_uninterrupted_run(step, prepared, uninterrupted,
                                                           step_log, tmp_path, caplog):
    cfg = _config(step, prepared, tmp_path, **{f"{step}.save_every": 2})
    step_log.kill_at = 3
    with pytest.raises(Killed):
        RUNNERS[step](cfg)
    assert latest_checkpoint(tmp_path / step) == tmp_path / step / "checkpoints" / "step-2"

    step_log.restart()
    with caplog.at_level(logging.INFO, logger="rlhf"):
        result = RUNNERS[step](cfg, resume=True)
    assert step_log.steps == [3, 4]  # steps 1-2 came from the checkpoint, not computed again
    assert "resumed" in caplog.text
    _assert_same_run(step, result, tmp_path, *uninterrupted(step))


@pytest.mark.parametrize("step", ["sft", "rl"])
def test_crash_while_saving_leaves_a_temp_folder_that_is_ignored(step, prepared, uninterrupted,
                                                                  step_log, tmp_path,
                                                                  monkeypatch):
    checkpoints = tmp_path / step / "checkpoints"
    real_save = torch.save

    def save(obj, path, *args, **kwargs):  # dies after DeepSpeed's files, before the loop state
        if str(path).endswith("tmp-step-3/state-rank0.pt"):
            raise Killed("while saving step 3")
        return real_save(obj, path, *args, **kwargs)

    cfg = _config(step, prepared, tmp_path, **{f"{step}.save_every": 1})
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        with pytest.raises(Killed):
            RUNNERS[step](cfg)
    assert (checkpoints / "tmp-step-3").is_dir() and any((checkpoints / "tmp-step-3").iterdir())
    assert not (checkpoints / "step-3").exists()
    assert (checkpoints / "latest").read_text() == "step-2"
    assert latest_checkpoint(tmp_path / step) == checkpoints / "step-2"

    step_log.restart()
    result = RUNNERS[step](cfg, resume=True)
    assert step_log.steps == [3, 4]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-1", "step-2",
                                                             "step-3"]
    assert (checkpoints / "latest").read_text() == "step-3"
    _assert_same_run(step, result, tmp_path, *uninterrupted(step))


def test_resume_without_a_checkpoint_starts_from_the_beginning(prepared, uninterrupted,
                                                               step_log, tmp_path):
    result = run_sft(_config("sft", prepared, tmp_path), resume=True)
    assert step_log.steps == [1, 2, 3, 4]
    _assert_same_run("sft", result, tmp_path, *uninterrupted("sft"))


def _fake_checkpoint(checkpoints, name):
    folder = checkpoints / name
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.pt").write_bytes(b"the weights of " + name.encode())
    write_manifest(folder)
    return folder


def test_latest_checkpoint_is_the_pointer_or_the_newest_that_verifies(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) is None  # nothing saved yet
    (checkpoints / "tmp-step-5").mkdir(parents=True)
    assert latest_checkpoint(tmp_path) is None  # a temp folder alone is never picked
    step2, step4 = _fake_checkpoint(checkpoints, "step-2"), _fake_checkpoint(checkpoints, "step-4")
    (checkpoints / "step-10").mkdir()  # renamed, never finished: no manifest
    (checkpoints / "latest").write_text("step-2\n")
    assert latest_checkpoint(tmp_path) == step2  # the pointer wins while it verifies
    broken = {"step-9": "names step-9, which does not exist", "\x00\x01": "not a checkpoint name",
              "../step-4": "not a checkpoint name", "": "not a checkpoint name"}
    for pointer, why in broken.items():
        (checkpoints / "latest").write_text(pointer)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rlhf"):
            assert latest_checkpoint(tmp_path) == step4
        assert why in caplog.text and "resuming from" in caplog.text
    (checkpoints / "latest").write_bytes(b"\xff\xfe")  # not text at all
    assert latest_checkpoint(tmp_path) == step4
    (step4 / "model" / "weights.pt").write_bytes(b"x")
    (checkpoints / "latest").write_text("step-4")
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        assert latest_checkpoint(tmp_path) == step2
    assert "model/weights.pt has 1 bytes" in caplog.text
    (step2 / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be resumed .*step-4: "
                                              r"model/weights.pt has 1 bytes.*step-2 has no "
                                              r"manifest.json.*--overwrite"):
        latest_checkpoint(tmp_path)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("pointer", ["step-7", "\x00 not a name"])
def test_a_broken_pointer_resumes_from_the_newest_intact_checkpoint(pointer, prepared,
                                                                    uninterrupted, step_log,
                                                                    tmp_path, caplog):
    cfg = _config("sft", prepared, tmp_path, **{"sft.save_every": 1})
    step_log.kill_at = 3
    with pytest.raises(Killed):
        run_sft(cfg)
    (tmp_path / "sft" / "checkpoints" / "latest").write_text(pointer)
    step_log.restart()
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        result = run_sft(cfg, resume=True)
    assert "resuming from" in caplog.text and "step-2, the newest checkpoint" in caplog.text
    assert step_log.steps == [3, 4]  # not a restart from step 0 over the checkpoints
    _assert_same_run("sft", result, tmp_path, *uninterrupted("sft"))


def test_a_flipped_byte_is_named_and_never_resumed(prepared, uninterrupted, step_log, tmp_path,
                                                   caplog):
    checkpoints = tmp_path / "sft" / "checkpoints"
    cfg = _config("sft", prepared, tmp_path, **{"sft.save_every": 1})
    step_log.kill_at = 3
    with pytest.raises(Killed):
        run_sft(cfg)
    weights = "model/mp_rank_00_model_states.pt"
    step1 = (checkpoints / "step-1" / weights).read_bytes()
    _flip_byte(checkpoints / "step-2" / weights)
    _flip_byte(checkpoints / "step-1" / weights)
    metrics = (tmp_path / METRICS["sft"]).read_bytes()
    step_log.restart()
    with pytest.raises(CheckpointError, match=rf"step-2: {weights} fails its sha256 check.*"
                                              rf"step-1: {weights} fails its sha256 check"):
        run_sft(cfg, resume=True)  # none intact: an error, not a restart over them
    assert step_log.steps == [] and (tmp_path / METRICS["sft"]).read_bytes() == metrics
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-1", "step-2"]

    (checkpoints / "step-1" / weights).write_bytes(step1)
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        result = run_sft(cfg, resume=True)
    assert f"{weights} fails its sha256 check" in caplog.text
    assert step_log.steps == [2, 3, 4]  # from step 1, the newest that verifies
    verify_checkpoint(checkpoints / "step-2")  # written again, whole
    _assert_same_run("sft", result, tmp_path, *uninterrupted("sft"))


# A child process runs a step and SIGKILLs itself at one point of the checkpoint at step `at`
# (or before logging step `at`): argv = step, point, at, resume (0/1), output, overrides (JSON)
CHILD = """
import json, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from trainer_support import tiny_config
from rlhf.trainers import checkpoint
from rlhf.trainers.tracking import Tracker
from rlhf.trainers.rl import run_rl
from rlhf.trainers.sft import run_sft
step, point, at, resume, output, overrides = sys.argv[1:]
at, checkpoints = int(at), Path(output) / step / "checkpoints"
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_manifest, real_replace, real_log = checkpoint.write_manifest, os.replace, Tracker.log

def write_manifest(folder):
    if point == "before-manifest" and Path(folder).name == f"tmp-step-{at}":
        die()
    return real_manifest(folder)

def replace(src, dst):
    if point == "before-rename" and Path(src).name == f"tmp-step-{at}":
        die()
    if (point == "before-pointer" and Path(dst).name == "latest"
            and Path(src).read_text() == f"step-{at}"):
        die()
    return real_replace(src, dst)

def log(tracker, number, metrics):
    if point == "between-steps" and number == at:
        die()
    return real_log(tracker, number, metrics)

checkpoint.write_manifest, os.replace, Tracker.log = write_manifest, replace, log
run = {"sft": run_sft, "rl": run_rl}[step]
run(tiny_config(output, json.loads(overrides)), resume=resume == "1")
sys.exit(3)  # never reached: the kill point was not
"""
# (point, step of the kill, latest afterwards, what else is on disk): a chain, each child
# resuming what the one before left
KILLS = [("before-manifest", 2, "step-1", "tmp-step-2"),  # files written, no manifest
         ("before-rename", 2, "step-1", "tmp-step-2"),    # manifest written and synced
         ("before-pointer", 2, "step-1", "step-2"),       # renamed, `latest` not moved
         ("between-steps", 3, "step-2", None)]            # after step 3's update, before its log


def _killed_child(step, point, at, resume, output, overrides):
    env = subprocess_env()
    env["PYTHONPATH"] += f":{REPO_ROOT / 'tests'}"
    proc = subprocess.run([sys.executable, "-c", CHILD, step, point, str(at), str(int(resume)),
                           str(output), json.dumps(overrides)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("step, kills", [("sft", KILLS), ("rl", KILLS[2:3])])
def test_sigkill_anywhere_in_a_checkpoint_write_resumes_to_the_same_run(step, kills, prepared,
                                                                        uninterrupted, step_log,
                                                                        tmp_path):
    checkpoints = tmp_path / step / "checkpoints"
    overrides = {**prepared[step], **RUNS[step], f"{step}.save_every": 1}
    for i, (point, at, latest, left) in enumerate(kills):
        _killed_child(step, point, at, i > 0, tmp_path, overrides)
        assert (checkpoints / "latest").read_text() == latest, point
        if left is not None:
            assert (checkpoints / left).is_dir(), point
        if left == "step-2":
            verify_checkpoint(checkpoints / left)  # whole, though `latest` never named it
    resumed_from = int(kills[-1][2].split("-")[1])
    step_log.restart()
    result = RUNNERS[step](tiny_config(tmp_path, overrides), resume=True)
    assert step_log.steps == list(range(resumed_from + 1, STEPS + 1))
    _assert_same_run(step, result, tmp_path, *uninterrupted(step))


def test_tracker_of_a_resumed_run_drops_what_was_logged_after_the_checkpoint(tmp_path):
    first = Tracker(tmp_path, "sft", progress=False)
    for step in (1, 2, 3):
        first.log(step, {"loss": 10.0 + step})
    first.close()
    # the checkpoint held steps 1-2; step 3 is computed again, with another value
    second = Tracker(tmp_path, "sft", progress=False, history=first.history[:2])
    for step in (3, 4):
        second.log(step, {"loss": 20.0 + step})
    second.close()
    rows = read_jsonl(tmp_path / "metrics-sft.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    events = EventAccumulator(str(tmp_path / "logs" / "sft"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("sft/loss")] == [
        (1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    assert second.history == rows


def test_tracker_of_a_new_run_replaces_an_old_metrics_file(tmp_path):
    (tmp_path / "metrics-rm.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    tracker = Tracker(tmp_path, "rm", tensorboard=False, progress=False)
    tracker.log(1, {"loss": 1.5})
    tracker.close()
    assert read_jsonl(tmp_path / "metrics-rm.jsonl") == [{"step": 1, "loss": 1.5}]
