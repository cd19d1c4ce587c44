"""`rlhf sft | rm | ppo | pipeline | demo | eval`: every step of the trainer from the shell.

Options are the config's fields as --section.field (see `rlhf sft --help`), over a YAML file
given with --config. Runs under the `deepspeed` launcher for several processes or nodes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import add_config_arguments, config_from_args, save_config

COMMANDS = {
    "sft": "step 1: supervised fine-tuning",
    "rm": "step 2: reward model on preference pairs",
    "ppo": "step 3: RL (rl.algorithm: ppo | grpo | rloo | reinforce)",
    "pipeline": "steps 1, 2 and 3",
    "demo": "the embedded default: SFT -> RM -> PPO on a synthetic task, no network",
    "eval": "SFT perplexity, reward-model accuracy, mean reward and KL of the policy",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher puts --local_rank=N before the command; accept it after it too
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        add_config_arguments(cmd)
        if name in ("sft", "rm", "ppo", "pipeline"):
            cmd.add_argument("--resume", action="store_true",
                             help="continue from the latest checkpoint in the output folder")
        if name == "demo":
            cmd.add_argument("--tiny", action="store_true",
                             help="a small random model (minutes) instead of SmolLM2-135M")
        cmd.add_argument("--local_rank", type=int, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = parser()
    args = p.parse_args(argv)
    try:
        if args.command == "demo":  # its preset, then the flags given
            from .demo import demo_config, run_demo
            flags = {k: v for k, v in vars(args).items() if "." in k or k in ("output", "seed")}
            run_demo(demo_config(flags.pop("output", "output/demo"), args.tiny, flags,
                                 args.config))
            return 0
        cfg = config_from_args(args)
    except (ValueError, TypeError) as err:
        p.error(str(err))
    from .trainers import evaluate as ev
    from .trainers.reward import run_rm
    from .trainers.rl import run_rl
    from .trainers.sft import run_sft
    resume = getattr(args, "resume", False)
    if os.environ.get("RANK", "0") == "0":  # torch.distributed starts later: the launcher's env
        os.makedirs(cfg.output, exist_ok=True)
        save_config(cfg, f"{cfg.output}/config-{args.command}.yaml")
    results = {}
    if args.command in ("sft", "pipeline"):
        results["sft"] = run_sft(cfg, resume=resume)
    if args.command in ("rm", "pipeline"):
        results["rm"] = run_rm(cfg, resume=resume)
    if args.command in ("ppo", "pipeline"):
        rl = run_rl(cfg, resume=resume)
        results["rl"] = {k: v for k, v in rl.items() if k != "history"}
    if args.command == "eval":
        results = ev.evaluate_all(cfg)
    if os.environ.get("RANK", "0") == "0":  # one report per job, not one per process
        print(json.dumps(results, indent=2, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
