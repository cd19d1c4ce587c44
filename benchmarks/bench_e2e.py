"""End-to-end PPO step: our path (hybrid engine on rlhf_kernels) vs the same trainer with HF
`generate` and unfused torch losses (e2e_baselines.py).

    python benchmarks/bench_e2e.py [--model tiny|smollm2] [--iterations 8] [--batch 32]

It first trains a short SFT and reward model (the demo's task), then runs `run_rl` (PPO: actor,
critic, reference, reward model) once, its steps alternating between our path and the
baseline's, and reads the per-step time breakdown the trainer records, as DeepSpeed-Chat
reports it: generation (gather + generate), experience (reference / critic / reward forwards,
advantages) and training (actor + critic updates). The first step of each path is a warm-up
and is not counted. Alternating steps inside one run puts both paths on the same policy and
in the same minutes of a machine whose speed drifts.

Every rollout runs to exactly --new-tokens (EOS ignored, `rl.ignore_eos`): two sampled runs
drift apart and would otherwise process answers of different lengths, so the paths would not
do the same work. Fixed lengths make the rows comparable, as throughput benchmarks do.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from common import environment, markdown_table, publish  # noqa: E402
from e2e_baselines import baseline_path  # noqa: E402
from rlhf.demo import demo_config  # noqa: E402
from rlhf.engine.hybrid import HybridEngine  # noqa: E402
from rlhf.trainers.reward import run_rm  # noqa: E402
from rlhf.trainers.rl import run_rl  # noqa: E402
from rlhf.trainers.sft import run_sft  # noqa: E402
from rlhf.trainers.tracking import Tracker  # noqa: E402

PHASES = ("generation", "experience", "training")


def breakdown(row):
    return {"generation": row["time_generate"] + row.get("time_gather", 0.0),
            "experience": row["time_experience"], "training": row["time_train"]}


class Alternating:
    """Switches the trainer between our path and the baseline after every PPO step, so that
    both run in the same process, on the same policy and in the same minutes of the machine
    (whose speed drifts): step 1 ours, step 2 baseline, step 3 ours, ..."""

    def __init__(self):
        self.baseline, self.context, self.paths = False, None, {}

    def flip(self):
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.context = None
        self.baseline = not self.baseline
        if self.baseline:
            self.context = baseline_path()
            self.context.__enter__()

    @contextlib.contextmanager
    def patched(self):
        log, generate = Tracker.log, HybridEngine.generate

        def logged(tracker, step, metrics):  # the end of a PPO step
            log(tracker, step, {**metrics, "baseline": self.baseline})
            self.flip()

        def generated(engine, *args, **kwargs):
            out = generate(engine, *args, **kwargs)
            self.paths[self.baseline] = engine.last_path
            return out
        Tracker.log, HybridEngine.generate = logged, generated
        try:
            yield self
        finally:
            Tracker.log, HybridEngine.generate = log, generate
            if self.context is not None:
                self.context.__exit__(None, None, None)


def summarize(history):
    phases = {p: statistics.median(breakdown(r)[p] for r in history) for p in PHASES}
    return phases, statistics.median(r["response_len"] for r in history)


def run(model, iterations, batch, new_tokens, output):
    overrides = {"rl.steps": 2 * iterations, "rl.generation_batch_size": batch,
                 "rl.train_batch_size": min(batch, 16), "rl.max_new_tokens": new_tokens,
                 "rl.ignore_eos": True,
                 "sft.max_steps": 20, "rm.max_steps": 20, "log.progress": False,
                 "log.tensorboard": False, "data.num_synthetic": 1200,
                 "data.eval_fraction": 0.02}
    cfg = demo_config(output, model == "tiny", overrides)
    run_sft(cfg)
    run_rm(cfg)
    with Alternating().patched() as alternating:
        history = run_rl(cfg)["history"]
    # the first step of each path warms it up
    ours = [r for r in history if not r["baseline"]][1:]
    base = [r for r in history if r["baseline"]][1:]
    (ours, ours_tokens), (base, base_tokens) = summarize(ours), summarize(base)
    path, base_path = alternating.paths[False], alternating.paths[True]
    rows = []
    for name, phases, tokens in (("HF generate + torch losses", base, base_tokens),
                                 ("ours (rlhf_kernels)", ours, ours_tokens)):
        total = sum(phases.values())
        rows.append([new_tokens, name, *(f"{phases[p]:.3f}" for p in PHASES), f"{total:.3f}",
                     f"{batch / total:.1f}", f"{batch * tokens / total:.0f}"])
    rows[-1].append(f"**{sum(base.values()) / sum(ours.values()):.2f}x**")
    rows[0].append("1.00x")
    ratios = ", ".join(f"{p} {base[p] / ours[p]:.2f}x" for p in PHASES)
    return rows, ratios, path, base_path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    p.add_argument("--iterations", type=int, default=8,
                   help="PPO steps per path (the first a warm-up); the paths alternate")
    p.add_argument("--batch", type=int, default=32, help="prompts (= rollouts) per PPO step")
    p.add_argument("--new-tokens", default="20,64,128,256",
                   help="answer lengths, comma-separated (20: the demo's)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows, notes = [], []
    for new_tokens in (int(n) for n in args.new_tokens.split(",")):
        with tempfile.TemporaryDirectory() as output:
            setting, ratios, path, base_path = run(args.model, args.iterations, args.batch,
                                                   new_tokens, output)
        rows += setting
        notes.append(f"- {new_tokens} new tokens: {ratios}")
    header = ["new tokens", "path", "generation s", "experience s", "training s", "step s",
              "samples/s", "tokens/s", "speed-up"]
    command = "python benchmarks/bench_e2e.py " + " ".join(argv)
    text = (f"# End-to-end PPO step\n\n{environment(torch.device('cpu'))}\n\n"
            f"command: `{command.strip()}`\n\nmodel: {args.model} (the demo's); PPO with "
            f"actor, critic, reference and reward model; {args.batch} rollouts per step; "
            f"answers of exactly the given length (EOS ignored); "
            f"one run whose PPO steps alternate between the paths; median over "
            f"{args.iterations - 1} steps per path after one warm-up step each. Generation: ours "
            f"`{path}`; baseline `{base_path}`.\n\n{markdown_table(header, rows)}\n\n"
            f"Per phase (baseline time / ours):\n" + "\n".join(notes) + "\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
