"""ZeRO-3 on two CPU ranks through the `deepspeed` launcher: the tiny pipeline (SFT, reward
model, 2 PPO iterations) with every trained model partitioned over 2 gloo processes.

The first run JIT-builds DeepSpeed's shared-memory CPU collectives (about 100 s); the build is
kept in TORCH_EXTENSIONS_DIR (default ~/.cache/rlhf-torch-extensions) for later runs."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from trainer_support import TINY, cli_flags, printed_results, read_jsonl, subprocess_env

pytestmark = pytest.mark.slow

RANKS = 2
ZERO3 = {**TINY, "deepspeed.zero_stage": 3, "sft.max_steps": 2, "sft.per_device_batch_size": 4,
         "rm.max_steps": 2, "rm.per_device_batch_size": 4, "rl.save_every": 1}
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR",
                            str(Path.home() / ".cache" / "rlhf-torch-extensions"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """(output folder, the results each rank printed) of `deepspeed --num_gpus 2 -m rlhf.cli
    pipeline` (the launcher's entry module run with this interpreter)."""
    out = tmp_path_factory.mktemp("zero3")
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(RANKS),
                "--master_port", str(_free_port()), "--module"]
    proc = subprocess.run(
        [*launcher, "rlhf.cli", "pipeline", "--output", str(out), *cli_flags(ZERO3)],
        check=False, capture_output=True, text=True, timeout=230,
        env=subprocess_env(TORCH_EXTENSIONS_DIR=EXTENSIONS))
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return out, printed_results(proc.stdout)


def test_every_rank_ran_every_step(zero3_run):
    _, results = zero3_run
    assert len(results) == 1  # rank 0 reports for the job (the checkpoint test sees each rank)
    for ranks_results in results:
        assert set(ranks_results) == {"sft", "rm", "rl"}
        assert all(ranks_results[step]["world_size"] == RANKS for step in ranks_results)
        assert ranks_results["rl"]["iterations"] == ZERO3["rl.steps"]


def test_checkpoint_holds_each_ranks_partition(zero3_run):
    out, _ = zero3_run
    step = out / "rl" / "checkpoints" / "step-1"
    assert (out / "rl" / "checkpoints" / "latest").read_text() == "step-1"
    for rank in range(RANKS):
        assert (step / f"state-rank{rank}.pt").is_file()
        for engine in ("actor", "critic"):
            assert (step / engine / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()


def test_saved_models_are_whole_and_the_actor_learnt(zero3_run):
    out, _ = zero3_run
    sft, actor = load_file(out / "sft" / "model.safetensors"), load_file(
        out / "rl" / "actor" / "model.safetensors")
    assert sft.keys() == actor.keys()
    # gathered from both partitions: full shapes, not a rank's flat shard
    assert all(actor[k].shape == sft[k].shape and actor[k].numel() > 0 for k in sft)
    assert any(not actor[k].equal(sft[k]) for k in sft)
    assert (out / "rm" / "value_head.safetensors").is_file()
    rows = read_jsonl(out / "rl" / "metrics-rl-ppo.jsonl")  # written by rank 0 only
    assert [row["step"] for row in rows] == list(range(1, ZERO3["rl.steps"] + 1))
