"""End to end: SFT -> reward model -> RL with the tiny model, through the CLI, `rlhf eval`, the
demo entry, and every critic-free algorithm with a callable reward."""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trainer_support import (  # noqa: F401
    TINY,
    cli_flags,
    one_torch_thread,
    printed_results,
    read_jsonl,
    subprocess_env,
    tiny_config,
)

from rlhf.cli import main
from rlhf.config import load_config
from rlhf.data.synthetic import rule_score
from rlhf.trainers.rl import run_rl

SUMMARY_KEYS = {"reward_before", "reward_after", "rule_before", "rule_after", "kl_after"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """`python -m rlhf.cli pipeline` in a child process: (output folder, printed results)."""
    out = tmp_path_factory.mktemp("pipeline")
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "pipeline", "--output", str(out), *cli_flags(TINY)],
        check=False, capture_output=True, text=True, timeout=240, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = printed_results(proc.stdout)
    assert len(results) == 1, proc.stdout[-4000:]
    return out, results[0]


def _scalars(log_dir, tag):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _weights_differ(a_dir, b_dir) -> bool:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_pipeline_writes_each_step_model(pipeline):
    out, results = pipeline
    assert set(results) == {"sft", "rm", "rl"}
    assert results["sft"]["steps"] == TINY["sft.max_steps"]
    assert results["rm"]["steps"] == TINY["rm.max_steps"]
    assert results["rl"]["iterations"] == TINY["rl.steps"]
    assert all(results[step]["world_size"] == 1 for step in results)
    for folder in ("sft", "rm", "rl/actor"):
        assert (out / folder / "config.json").is_file(), folder
        assert (out / folder / "tokenizer.json").is_file(), folder
    assert (out / "rm" / "value_head.safetensors").is_file()
    assert _weights_differ(out / "sft", out / "rl" / "actor")  # RL moved the policy
    saved = load_config(out / "config-pipeline.yaml")
    assert saved.rl.steps == TINY["rl.steps"] and saved.output == str(out)


@pytest.mark.parametrize("folder, phase, keys", [
    ("sft", "sft", {"loss", "lr"}),
    ("rm", "rm", {"loss", "accuracy"}),
    ("rl", "rl-ppo", {"reward", "kl", "actor_loss", "critic_loss", "time_generate"}),
])
def test_pipeline_metrics_match_tensorboard(pipeline, folder, phase, keys):
    out, _ = pipeline
    rows = read_jsonl(out / folder / f"metrics-{phase}.jsonl")
    steps = TINY["rl.steps"] if phase.startswith("rl") else TINY[f"{folder}.max_steps"]
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert all(keys <= row.keys() and all(map(math.isfinite, row.values())) for row in rows)
    loss = "actor_loss" if phase.startswith("rl") else "loss"
    logged = _scalars(out / folder / "logs" / phase, f"{phase}/{loss}")
    assert logged == [(row["step"], pytest.approx(row[loss], rel=1e-6)) for row in rows]


def test_eval_reports_the_three_sections(pipeline, capsys):
    out, results = pipeline
    assert main(["eval", "--output", str(out), *cli_flags(TINY)]) == 0
    report = printed_results(capsys.readouterr().out)[-1]
    assert set(report) == {"sft_eval_perplexity", "rm_eval", "policy_eval"}
    # the saved models give back what the training run measured on the same held-out data
    assert report["sft_eval_perplexity"] == pytest.approx(results["sft"]["eval_ppl"], rel=1e-5)
    assert report["rm_eval"]["accuracy"] == pytest.approx(results["rm"]["eval_accuracy"])
    assert 0.0 <= report["rm_eval"]["accuracy"] <= 1.0
    policy = report["policy_eval"]
    assert {"reward", "kl", "response_len"} <= policy.keys()
    assert 1 <= policy["response_len"] <= TINY["rl.max_new_tokens"]
    assert policy["reward"] == pytest.approx(results["rl"]["eval_after"]["reward"], abs=1e-4)


def test_eval_of_an_empty_folder_says_so(tmp_path):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        main(["eval", "--output", str(tmp_path), *cli_flags(TINY)])


def test_demo_writes_summary_and_plot(tmp_path, capsys):
    shrink = {"data.num_synthetic": 300, "log.progress": False,
              "sft.max_steps": 2, "sft.warmup": 0, "sft.per_device_batch_size": 8,
              "rm.max_steps": 2, "rm.warmup": 0, "rm.per_device_batch_size": 8,
              "rl.steps": 2, "rl.generation_batch_size": 4, "rl.train_batch_size": 4,
              "rl.max_new_tokens": 8}
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--output", str(out), *cli_flags(shrink)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS | {"seconds"} <= summary.keys()
    assert set(summary["seconds"]) == {"sft", "rm", "ppo"}
    assert all(isinstance(summary[k], float) and math.isfinite(summary[k]) for k in SUMMARY_KEYS)
    assert all(s > 0 for s in summary["seconds"].values())
    assert -1.0 <= summary["rule_before"] <= 1.0 and -1.0 <= summary["rule_after"] <= 1.0
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(out / "config.yaml").rl.steps == 2  # the flags went over the preset
    history = read_jsonl(out / "rl" / "metrics-rl-ppo.jsonl")
    assert len(history) == 2 and all("rule" in row for row in history)
    assert "rule score" in capsys.readouterr().out


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce"])
def test_critic_free_algorithm_with_callable_reward(pipeline, tmp_path, algorithm):
    sft_dir = pipeline[0] / "sft"
    cfg = tiny_config(tmp_path, {
        "sft.model_path": str(sft_dir), "rm.model_path": str(tmp_path / "no-reward-model"),
        "rl.algorithm": algorithm, "rl.reward": "rlhf.data.synthetic:rule_score",
        "rl.num_samples": 2, "rl.generation_batch_size": 2, "rl.kl_ctl": 0.05})
    result = run_rl(cfg, extra_scores={"rule": rule_score})
    history = result["history"]
    assert [row["step"] for row in history] == [1, 2]
    for row in history:
        assert "critic_loss" not in row and math.isfinite(row["actor_loss"])
        # the optimised reward is the callable's own score of the same responses
        assert row["reward"] == pytest.approx(row["rule"], abs=1e-6)
    assert result["iterations"] == 2 and result["world_size"] == 1
    assert (tmp_path / "rl" / f"metrics-rl-{algorithm}.jsonl").is_file()
    assert _weights_differ(sft_dir, tmp_path / "rl" / "actor")
