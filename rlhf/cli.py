"""`rlhf sft | rm | ppo | pipeline | demo | eval`: every step of the trainer from the shell.

Options are the config's fields as --section.field (see `rlhf sft --help`), over a YAML file
given with --config. Runs under the `deepspeed` launcher for several processes or nodes.

A run that stops on a setting, a file or the data prints one line, `rlhf <command>: error:
<cause>`, on rank 0 and exits with 1 (2: a bad flag or config; 130: interrupted); --debug
shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import yaml

import rlhf_kernels

from .config import add_config_arguments, config_from_args, save_config
from .config_tree import close_key

COMMANDS = {
    "sft": "step 1: supervised fine-tuning",
    "rm": "step 2: reward model on preference pairs",
    "ppo": "step 3: RL (rl.algorithm: ppo | grpo | rloo | reinforce)",
    "pipeline": "steps 1, 2 and 3",
    "demo": "the embedded default: SFT -> RM -> PPO on a synthetic task, no network",
    "eval": "SFT perplexity, reward-model accuracy, mean reward and KL of the policy",
}
STEP_COMMANDS = ("sft", "rm", "ppo", "pipeline")
# the folders of the code whose errors are the run's own (a setting, a file, the data): one line
_OWN_CODE = tuple(os.path.dirname(os.path.abspath(f)) + os.sep
                  for f in (__file__, rlhf_kernels.__file__))
_RUN_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


def _add_command(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    flags = " [--resume] [--overwrite]" if name in STEP_COMMANDS else \
        " [--tiny]" if name == "demo" else ""
    # no prefix matching: a mistyped flag is an error with a guess, never another setting
    cmd = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False,
                         usage=f"rlhf {name} [-h] [--config PATH.yaml] [--section.field VALUE ...]"
                               f"{flags} [--debug]")
    add_config_arguments(cmd)
    if name in STEP_COMMANDS:
        cmd.add_argument("--resume", action="store_true",
                         help="continue from the latest checkpoint in the output folder")
        cmd.add_argument("--overwrite", action="store_true",
                         help="write into a run folder that already holds a run (default: "
                              "refuse; --resume continues it)")
    if name == "demo":
        cmd.add_argument("--tiny", action="store_true",
                         help="a small random model (minutes) instead of SmolLM2-135M")
    cmd.add_argument("--debug", action="store_true",
                     help="on an error, the full traceback instead of one line")
    cmd.add_argument("--local_rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return cmd


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher puts --local_rank=N before the command; accept it after it too
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = {name: _add_command(sub, name, text) for name, text in COMMANDS.items()}
    return p


def _parse_args(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """parse_args, with "did you mean" for an unknown --flag (as for an unknown YAML key)."""
    args, extras = p.parse_known_args(argv)
    if extras:
        cmd = p.commands[args.command]
        known = [s[2:] for a in cmd._actions for s in a.option_strings
                 if s.startswith("--") and a.help != argparse.SUPPRESS]
        guesses = [close_key(x[2:].split("=", 1)[0], known) for x in extras if x.startswith("--")]
        guesses = list(dict.fromkeys(f"--{g}" for g in guesses if g))
        hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        cmd.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    return args


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _config(args: argparse.Namespace):
    if args.command == "demo":  # its preset, then the flags given
        from .demo import demo_config
        flags = {k: v for k, v in vars(args).items() if "." in k or k in ("output", "seed")}
        return demo_config(flags.pop("output", "output/demo"), args.tiny, flags, args.config)
    return config_from_args(args)


def _run(args: argparse.Namespace, cfg) -> dict | None:
    if args.command == "demo":
        from .demo import run_demo
        run_demo(cfg)
        return None
    from .trainers import evaluate as ev
    from .trainers.reward import run_rm
    from .trainers.rl import run_rl
    from .trainers.sft import run_sft
    if _rank() == 0:  # torch.distributed starts later: the launcher's env
        os.makedirs(cfg.output, exist_ok=True)
        save_config(cfg, f"{cfg.output}/config-{args.command}.yaml")
    if args.command == "eval":
        return ev.evaluate_all(cfg)
    step = {"resume": args.resume, "overwrite": args.overwrite}
    results = {}
    if args.command in ("sft", "pipeline"):
        results["sft"] = run_sft(cfg, **step)
    if args.command in ("rm", "pipeline"):
        results["rm"] = run_rm(cfg, **step)
    if args.command in ("ppo", "pipeline"):
        rl = run_rl(cfg, **step)
        results["rl"] = {k: v for k, v in rl.items() if k != "history"}
    return results


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK") or 0)


def _raised_by_own_code(err: BaseException) -> bool:
    """True for an error whose raise is in rlhf / rlhf_kernels (a setting, a file, the data),
    or any OSError; not for a bug surfacing in a library or in a user's reward function."""
    if isinstance(err, OSError):
        return True
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and \
        os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_OWN_CODE)


def _stop(command: str, message: str, code: int) -> int:
    """One line on rank 0; the other ranks exit with the same code, quietly."""
    if _rank() == 0:
        print(f"rlhf {command}: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv=None) -> int:
    """The `rlhf` command. From the shell (argv None) an error of the run is one line and an
    exit code; called with an argv list, from Python, the exception propagates as from run_sft."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = parser()
    args = _parse_args(p, argv)
    try:
        cfg = _config(args)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as err:
        p.commands[args.command].error(_one_line(err))  # exits with 2
    catch = argv is None and not args.debug
    try:
        results = _run(args, cfg)
    except KeyboardInterrupt:
        if not catch:
            raise
        return _stop(args.command, "interrupted", 130)
    except _RUN_ERRORS as err:
        if not catch or not _raised_by_own_code(err):
            raise
        return _stop(args.command, _one_line(err), 1)
    if results is not None and _rank() == 0:  # one report per job, not one per process
        print(json.dumps(results, indent=2, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
