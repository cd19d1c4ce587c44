"""The supervised loop shared by SFT and the reward model: where the reward model starts from,
and how log.log_every groups the optimizer steps into metrics rows."""
import pytest
import torch
from trainer_support import one_torch_thread, read_jsonl, tiny_config  # noqa: F401

from rlhf.trainers.reward import rm_init_path
from rlhf.trainers.sft import run_sft
from rlhf.trainers.tracking import Tracker


def test_rm_starts_from_the_sft_model_only_when_step_1_wrote_one(tmp_path):
    cfg = tiny_config(tmp_path)
    assert rm_init_path(cfg) == cfg.model.name_or_path
    (tmp_path / "sft").mkdir()
    assert rm_init_path(cfg) == cfg.model.name_or_path  # an empty folder is no model
    (tmp_path / "sft" / "config.json").write_text("{}")
    assert rm_init_path(cfg) == tmp_path / "sft"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")
    assert rm_init_path(tiny_config(tmp_path, {"sft.model_path": str(elsewhere)})) == elsewhere


@pytest.fixture
def logged(monkeypatch):
    """Every (step, metrics) the loop hands the Tracker, before any averaging."""
    calls = []
    real = Tracker.log

    def log(tracker, step, metrics):
        calls.append((step, dict(metrics)))
        return real(tracker, step, metrics)
    monkeypatch.setattr(Tracker, "log", log)
    return calls


def _mean_of(calls, steps):
    names = {name for step, metrics in calls if step in steps for name in metrics}
    return {name: sum(m[name] for s, m in calls if s in steps and name in m)
            / sum(1 for s, m in calls if s in steps and name in m) for name in names}


def test_log_every_writes_averaged_rows_at_its_multiples(tmp_path, logged):
    cfg = tiny_config(tmp_path, {"sft.max_steps": 4, "sft.eval_every": 2, "log.log_every": 2,
                                 "log.tensorboard": False})
    run_sft(cfg)
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    rows = read_jsonl(tmp_path / "sft" / "metrics-sft.jsonl")
    assert [row["step"] for row in rows] == [2, 4]
    for row, steps in zip(rows, ([1, 2], [3, 4])):
        want = _mean_of(logged, steps)
        assert set(row) == {"step", "loss", "lr", "eval_ppl"}
        assert row == pytest.approx({"step": steps[-1], **want}, rel=1e-12)
    assert rows[0]["loss"] != pytest.approx(logged[1][1]["loss"])  # an average, not step 2


def test_a_checkpoint_holds_the_steps_not_yet_written(tmp_path, logged):
    cfg = tiny_config(tmp_path, {"sft.max_steps": 4, "sft.save_every": 2, "log.log_every": 4,
                                 "log.tensorboard": False})
    run_sft(cfg)
    state = torch.load(tmp_path / "sft" / "checkpoints" / "step-2" / "state-rank0.pt",
                       weights_only=False)
    assert set(state) == {"micro_step", "history", "rng"}
    assert state["micro_step"] == 2
    assert [row["step"] for row in state["history"]] == [2]
    assert state["history"][0]["loss"] == pytest.approx(_mean_of(logged, [1, 2])["loss"])
    rows = read_jsonl(tmp_path / "sft" / "metrics-sft.jsonl")
    assert [row["step"] for row in rows] == [2, 4]
