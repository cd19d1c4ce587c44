"""Shared pieces of the trainer tests: a config small enough for seconds per step on a CPU,
CLI flags from it, and readers for what a run writes (metrics files, printed results)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rlhf.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

# the tiny random Llama on 300 synthetic records: each step a few optimizer steps of small batches
TINY = {
    "model.name_or_path": "tiny", "model.max_seq_len": 64,
    "data.num_synthetic": 300, "data.max_prompt_len": 64,
    "deepspeed.torch_adam": True, "log.progress": False,
    "sft.max_steps": 3, "sft.per_device_batch_size": 8, "sft.per_device_eval_batch_size": 32,
    "sft.lr": 1e-3,
    "rm.max_steps": 3, "rm.per_device_batch_size": 8, "rm.per_device_eval_batch_size": 32,
    "rm.lr": 1e-3,
    "rl.steps": 2, "rl.generation_batch_size": 4, "rl.train_batch_size": 4,
    "rl.max_new_tokens": 8, "rl.warmup": 0, "rl.actor_lr": 1e-3, "rl.critic_lr": 1e-3,
}


def tiny_config(output, overrides: dict | None = None):
    """A validated RunConfig: TINY, writing to `output`, then `overrides` (dotted keys)."""
    return load_config(None, {**TINY, "output": str(output), **(overrides or {})})


def cli_flags(overrides: dict) -> list[str]:
    """["--section.field", "value", ...] as a person would type them."""
    flags = []
    for key, value in overrides.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        flags += [f"--{key}", text]
    return flags


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while a module's runs go: on a small shared CPU, OpenMP workers that
    spin-wait for a busy core make the tiny model's steps tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that imports this checkout's packages (one OpenMP
    thread per process, as `one_torch_thread`)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)  # set by this process's own single-rank group: not the child's
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def printed_results(stdout: str) -> list[dict]:
    """Every JSON object the CLI printed (one per rank), in order, between other log lines."""
    decoder, found, lines = json.JSONDecoder(), [], stdout.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip("\n") == "{":
            value, _ = decoder.raw_decode("".join(lines[i:]))
            found.append(value)
    return found


def learning_metrics(history: list[dict]) -> list[dict]:
    """The history rows without wall-clock timings (the part two equal runs share)."""
    return [{k: v for k, v in row.items() if not k.startswith("time_")} for row in history]
