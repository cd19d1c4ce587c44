"""Run configuration: dataclasses with DeepSpeed-Chat's defaults, loaded from YAML and CLI flags.

Precedence is defaults < YAML file < overrides (CLI flags or a dict). Every leaf field is
reachable as ``--section.field`` (``--rl.kl_ctl 0.05``) or as a top-level flag (``--seed 7``).
Defaults follow DeepSpeed-Chat's step 1/2/3 ``main.py`` arguments except where noted.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from rlhf_kernels.reference.ppo_loss import AGGREGATIONS, KL_ESTIMATORS

from .config_tree import apply, coerce, flatten, leaf_help, leaf_types

DTYPES = ("fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant")
# "auto": the algorithm's own estimator (Algorithm.default_kl_estimator)
KL_ESTIMATOR_CHOICES = ("auto",) + KL_ESTIMATORS
ADAM_BETAS = (0.9, 0.95)  # DeepSpeed-Chat's choice


def _f(default, help_text: str):
    """A dataclass field with a help string (shown by ``--help``); lists get a fresh copy."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default),
                                 metadata={"help": help_text})
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclass
class ModelConfig:
    name_or_path: str = _f("smollm2", '"smollm2" (embedded GGUF), "tiny" (random Llama-style), '
                                      "a local path or a hub name")
    tokenizer: str = _f("", 'tokenizer path or name ("" = the model\'s)')
    dtype: str = _f("fp32", "fp32 | bf16 | fp16 (fp32 here: DeepSpeed-Chat's fp16 needs a GPU)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward")
    lora_dim: int = _f(0, "LoRA rank; 0 trains the full model")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch")
    lora_target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"],
                                        "module names LoRA wraps (comma-separated on the CLI)")
    max_seq_len: int = _f(512, "longest SFT / reward-model sequence in tokens (prompt + answer)")


@dataclass
class DataConfig:
    sources: list[str] = _f(["synthetic"], "synthetic | file.jsonl/.json/.parquet | folder | "
                                           "datasets name[:split]")
    data_split: str = _f("2,4,4", "share of every source for the sft, rm and rl steps")
    eval_fraction: float = _f(0.1, "held-out share of each step's records")
    max_prompt_len: int = _f(256, "prompts longer than this (tokens) are dropped for RL")
    num_synthetic: int = _f(2000, "records made by the synthetic source")
    train_on_prompt: bool = _f(False, "SFT loss on the prompt tokens too")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _f(0, "ZeRO stage 0-3 of the trained models")
    offload: bool = _f(False, "ZeRO-Offload of optimizer state (and parameters at stage 3) to CPU")
    offload_reference_model: bool = _f(False, "keep the frozen reference model's parameters in "
                                              "CPU memory (ZeRO-3 parameter offload; needs "
                                              "zero_stage 3)")
    torch_adam: bool = _f(False, "torch AdamW instead of DeepSpeed's fused / CPU Adam")
    adam_betas: list[float] = _f(list(ADAM_BETAS), "AdamW betas of every trained model "
                                                   "(DeepSpeed-Chat's choice)")
    gradient_clipping: float = _f(1.0, "global gradient-norm clip")


@dataclass
class StepConfig:
    """One supervised step (SFT or reward model); the defaults are step 1's."""
    # DeepSpeed-Chat's step-1 argparse default lr is 1e-3; its example scripts all pass 9.65e-6,
    # the value that works for fine-tuning a pretrained model, so that is the default here.
    lr: float = _f(9.65e-6, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    epochs: int = _f(1, "passes over the training records")
    per_device_batch_size: int = _f(16, "micro-batch size per device")
    per_device_eval_batch_size: int = _f(16, "eval batch size per device")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    warmup: int = _f(0, "warm-up optimizer steps")
    scheduler: str = _f("cosine", "cosine | linear | constant")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1 = run all epochs)")
    eval_every: int = _f(0, "evaluate every N optimizer steps (0 = at the end only)")
    save_every: int = _f(0, "checkpoint every N optimizer steps (0 = at the end only)")
    model_path: str = _f("", 'where later steps read this step\'s model ("" = <output>/<step>)')
    head_lr_scale: float = _f(1.0, "value-head learning rate = lr x this (reward model)")


def _rm_defaults() -> StepConfig:
    return StepConfig(lr=5e-5)  # DeepSpeed-Chat step 2


@dataclass
class RLConfig:
    algorithm: str = _f("ppo", "ppo | grpo | rloo | reinforce")
    actor_lr: float = _f(9.65e-6, "actor learning rate")
    critic_lr: float = _f(5e-6, "critic learning rate (ppo)")
    actor_weight_decay: float = _f(0.0, "actor AdamW weight decay")
    critic_weight_decay: float = _f(0.0, "critic AdamW weight decay")
    warmup: int = _f(100, "warm-up optimizer steps")
    scheduler: str = _f("cosine", "cosine | linear | constant")
    kl_ctl: float = _f(0.1, "KL penalty coefficient against the reference model (0: no "
                            "reference model, no KL term)")
    kl_estimator: str = _f("auto", "auto | k1 | k2 | k3: estimator of the KL to the reference. "
                                   "auto = k1 in the per-token reward (ppo, rloo, reinforce; "
                                   "DeepSpeed-Chat) and k3 in the actor loss (grpo), where k1's "
                                   "expected gradient is zero")
    clip_reward_value: float = _f(5.0, "scores are clipped to +-this")
    cliprange: float = _f(0.2, "PPO ratio clip")
    cliprange_value: float = _f(0.2, "value clip (ppo)")
    dual_clip: Optional[float] = _f(None, "dual-clip bound for negative advantages (None = off)")
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE lambda")
    whiten_advantages: bool = _f(False, "normalise ppo's GAE advantages over the batch")
    scale_by_std: bool = _f(True, "grpo divides by the group's score std (false: Dr. GRPO)")
    group_std_eps: float = _f(1e-4, "added to the group std before dividing (grpo)")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient")
    loss_agg: str = _f("token-mean", "loss aggregation: " + " | ".join(AGGREGATIONS))
    ppo_epochs: int = _f(1, "passes over each batch of experience")
    generation_batch_size: int = _f(16, "prompts per generation batch per device")
    train_batch_size: int = _f(16, "experiences per training micro-batch per device")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    num_samples: Optional[int] = _f(None, "responses per prompt (None = the algorithm's: 1 for "
                                          "ppo / reinforce, 4 for grpo / rloo, whose group it is)")
    min_response_tokens: int = _f(2, "rollouts with fewer response tokens (EOS included) are "
                                     "dropped, a group whole (DeepSpeed-Chat: 2; 0 keeps all); "
                                     "when a batch drops all, the last kept rollouts are reused")
    recompute_logprobs: bool = _f(False, "old log-probs from a forward of the actor "
                                         "(DeepSpeed-Chat) instead of the sampler's")
    temperature: float = _f(1.0, "sampling temperature")
    top_k: int = _f(0, "top-k sampling (0 = off)")
    top_p: float = _f(1.0, "nucleus sampling (1.0 = off)")
    max_new_tokens: int = _f(256, "longest generated answer in tokens")
    ignore_eos: bool = _f(False, "rollouts run to max_new_tokens past EOS (fixed-length "
                          "throughput benchmarks)")
    enable_ema: bool = _f(False, "keep an EMA copy of the actor")
    ema_beta: float = _f(0.992, "EMA decay")
    ptx: bool = _f(False, "mix the pretraining (SFT) loss into the actor update")
    ptx_coef: float = _f(27.8, "weight of the mixed pretraining loss")
    ptx_sources: list[str] = _f([], "sources of the ptx loss ([] = the SFT step's records)")
    reward: str = _f("", '"" = the reward model of the rm step, or a callable "module:function"'
                         " (code: the module is imported and run; the current folder is "
                         "importable, as under python -m)")
    reward_timeout: float = _f(600.0, "seconds one call of a reward function may take before the "
                                      "run stops with an error naming it (0 = no limit)")
    critic_model_path: str = _f("", 'critic initialisation ("" = the reward model)')
    steps: int = _f(-1, "stop after this many RL iterations (-1 = run all epochs)")
    epochs: int = _f(1, "passes over the RL prompts")
    eval_every: int = _f(0, "evaluate every N iterations (0 = at the end only)")
    save_every: int = _f(0, "checkpoint every N iterations (0 = at the end only)")


@dataclass
class LogConfig:
    tensorboard: bool = _f(True, "write TensorBoard events under <output>/logs")
    wandb: bool = _f(False, "log to Weights & Biases when installed")
    wandb_project: str = _f("rlhf", "W&B project name")
    log_every: int = _f(1, "log every N optimizer steps")
    progress: bool = _f(True, "show progress bars")


@dataclass
class RunConfig:
    output: str = _f("output", "run folder")
    seed: int = _f(1234, "seed of data shuffling, sampling and initialisation")
    max_skipped_steps: int = _f(10, "updates whose loss is non-finite are skipped and counted; "
                                    "this many in a row stop the run with an error (0 = never)")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    sft: StepConfig = dataclasses.field(default_factory=StepConfig)
    rm: StepConfig = dataclasses.field(default_factory=_rm_defaults)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)


# ---------------------------------------------------------------------------- validation

def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"config key {key!r} {message}, got {value!r}")


def _check_choice(section, prefix: str, name: str, choices) -> None:
    value = getattr(section, name)
    _require(value in choices, f"{prefix}.{name}", f"must be one of {', '.join(choices)}", value)


def _check_min(section, prefix: str, minimum: dict[str, float]) -> None:
    for name, low in minimum.items():
        value = getattr(section, name)
        _require(value >= low, f"{prefix}.{name}", f"must be >= {low}", value)


def parse_data_split(text: str) -> tuple[float, float, float]:
    """'2,4,4' -> (0.2, 0.4, 0.4): the shares of the sft, rm and rl steps."""
    try:
        parts = [float(p) for p in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 or p != p for p in parts) or sum(parts) <= 0:
        raise ValueError(f"config key 'data.data_split' must be three comma-separated non-negative "
                         f"numbers with a positive sum (sft,rm,rl), got {text!r}")
    total = sum(parts)
    return tuple(p / total for p in parts)


def check_rl_hparams(rl, prefix: str = "rl.") -> None:
    """The checks of the RL hyper-parameters, on the config's `rl` section or on an RLHParams
    (prefix ""): one place for both edges. ValueError names the field."""
    def require(ok, name, message):
        if not ok:
            where = f"config key {prefix + name!r}" if prefix else name
            raise ValueError(f"{where} {message}, got {getattr(rl, name)!r}")
    require(rl.kl_estimator in KL_ESTIMATOR_CHOICES, "kl_estimator",
            f"must be one of {', '.join(KL_ESTIMATOR_CHOICES)}")
    require(rl.loss_agg in AGGREGATIONS, "loss_agg", f"must be one of {', '.join(AGGREGATIONS)}")
    for name in ("kl_ctl", "entropy_coef", "ptx_coef", "group_std_eps"):
        require(getattr(rl, name) >= 0, name, "must be >= 0")
    for name in ("cliprange", "cliprange_value", "temperature"):
        require(getattr(rl, name) > 0, name, "must be > 0")
    require(rl.clip_reward_value is None or rl.clip_reward_value > 0, "clip_reward_value",
            "must be > 0")
    require(rl.dual_clip is None or rl.dual_clip > 1, "dual_clip", "must be None or > 1")
    for name in ("gamma", "lam"):
        require(0 <= getattr(rl, name) <= 1, name, "must be in [0, 1]")
    for name in ("ppo_epochs", "train_batch_size"):
        value = getattr(rl, name)
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                "must be an integer >= 1")
    num = rl.num_samples
    require(num is None or (isinstance(num, int) and not isinstance(num, bool) and num >= 1),
            "num_samples", "must be None or an integer >= 1")


def _validate_model_data(cfg: RunConfig) -> None:
    m, d, ds = cfg.model, cfg.data, cfg.deepspeed
    _check_choice(m, "model", "dtype", DTYPES)
    _require(bool(m.name_or_path), "model.name_or_path", "must not be empty", m.name_or_path)
    _check_min(m, "model", {"lora_dim": 0, "lora_alpha": 0, "lora_dropout": 0, "max_seq_len": 1})
    _require(m.lora_dropout < 1, "model.lora_dropout", "must be < 1", m.lora_dropout)
    _require(bool(d.sources), "data.sources", "must name at least one source", d.sources)
    parse_data_split(d.data_split)
    _require(0 < d.eval_fraction < 1, "data.eval_fraction",
             "must be in (0, 1): each step evaluates on its held-out share", d.eval_fraction)
    _check_min(d, "data", {"max_prompt_len": 1, "num_synthetic": 1})
    _require(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3",
             ds.zero_stage)
    _require(not ds.offload or ds.zero_stage > 0, "deepspeed.offload",
             "needs deepspeed.zero_stage 1, 2 or 3 (stage 0 keeps everything on the device)",
             ds.offload)
    _require(not ds.offload_reference_model or ds.zero_stage == 3,
             "deepspeed.offload_reference_model",
             "needs deepspeed.zero_stage 3 (the reference is partitioned only at stage 3)",
             ds.offload_reference_model)
    _require(len(ds.adam_betas) == 2 and all(0 <= b < 1 for b in ds.adam_betas),
             "deepspeed.adam_betas", "must be two numbers in [0, 1)", ds.adam_betas)
    _check_min(ds, "deepspeed", {"gradient_clipping": 0})


def _validate_steps(cfg: RunConfig) -> None:
    for name in ("sft", "rm"):
        step = getattr(cfg, name)
        _require(step.lr > 0, f"{name}.lr", "must be > 0", step.lr)
        _check_choice(step, name, "scheduler", SCHEDULERS)
        _check_min(step, name, {"weight_decay": 0, "epochs": 1, "per_device_batch_size": 1,
                                "per_device_eval_batch_size": 1, "grad_accum": 1, "warmup": 0,
                                "max_steps": -1, "eval_every": 0, "save_every": 0,
                                "head_lr_scale": 0})
        _require(step.max_steps != 0, f"{name}.max_steps", "must be -1 or > 0", step.max_steps)


def _validate_rl(rl: RLConfig) -> None:
    from .algorithms.registry import ALGORITHMS  # the registry imports this module's defaults
    _check_choice(rl, "rl", "algorithm", tuple(ALGORITHMS))
    _check_choice(rl, "rl", "scheduler", SCHEDULERS)
    check_rl_hparams(rl)
    ALGORITHMS[rl.algorithm].check_num_samples(rl.num_samples, "rl.num_samples")
    for name in ("actor_lr", "critic_lr"):
        _require(getattr(rl, name) > 0, f"rl.{name}", "must be > 0", getattr(rl, name))
    _check_min(rl, "rl", {"actor_weight_decay": 0, "critic_weight_decay": 0, "warmup": 0,
                          "grad_accum": 1, "generation_batch_size": 1, "top_k": 0,
                          "min_response_tokens": 0, "max_new_tokens": 1, "steps": -1, "epochs": 1, "eval_every": 0,
                          "save_every": 0})
    _require(rl.steps != 0, "rl.steps", "must be -1 or > 0", rl.steps)
    _require(0 < rl.top_p <= 1, "rl.top_p", "must be in (0, 1]", rl.top_p)
    _require(0 < rl.ema_beta < 1, "rl.ema_beta", "must be in (0, 1)", rl.ema_beta)
    module, colon, function = rl.reward.partition(":")
    _require(not rl.reward or bool(colon and module and function), "rl.reward",
             'must be "" or "module:function"', rl.reward)


def validate(cfg: RunConfig) -> RunConfig:
    """Raise ValueError naming the first field whose value is out of range; return `cfg`."""
    _require(bool(cfg.output), "output", "must name a folder", cfg.output)
    _validate_model_data(cfg)
    _validate_steps(cfg)
    _validate_rl(cfg.rl)
    _check_min(cfg.log, "log", {"log_every": 1})
    _require(cfg.max_skipped_steps >= 0, "max_skipped_steps", "must be >= 0",
             cfg.max_skipped_steps)
    _require(cfg.rl.reward_timeout >= 0, "rl.reward_timeout", "must be >= 0 (0 = no limit)",
             cfg.rl.reward_timeout)
    return cfg


# ---------------------------------------------------------------------------- loading / saving

def _read_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        tree = yaml.safe_load(fh)
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ValueError(f"config file {path}: expected a mapping at the top, "
                         f"got {type(tree).__name__}")
    return tree


def load_config(yaml_path: str | os.PathLike | None = None, overrides: dict | None = None,
                cls=RunConfig):
    """Build a validated config: defaults < the YAML file < `overrides`.

    Args:
        yaml_path: optional YAML file with nested sections (``rl: {kl_ctl: 0.05}``) or dotted keys.
        overrides: nested or dotted dict (``{"rl.kl_ctl": 0.05}``); strings parse as on the CLI.
        cls: the root dataclass (RunConfig).

    Raises:
        ValueError: unknown key (names it and the valid ones) or a value out of range.
        TypeError: a value that does not parse as its field's type (names the field).
    """
    cfg = cls()
    if yaml_path is not None:
        apply(cfg, flatten(_read_yaml(os.fspath(yaml_path)), cls))
    if overrides:
        apply(cfg, flatten(overrides, cls))
    if isinstance(cfg, RunConfig):
        validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    """Nested plain dict of the config (YAML / JSON ready)."""
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML; ``load_config(path)`` gives it back."""
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


def add_config_arguments(parser: argparse.ArgumentParser, cls=RunConfig) -> argparse.ArgumentParser:
    """Add ``--config PATH.yaml`` and one ``--section.field`` flag per leaf field of `cls`.

    Flags left out do not appear in the parsed namespace, so YAML values are only overridden by
    flags actually given. Bools take true/false/1/0, lists take comma-separated items.
    """
    parser.add_argument("--config", metavar="PATH.yaml", default=None,
                        help="YAML config file (defaults < file < flags)")
    group = parser.add_argument_group("configuration (--section.field)")
    helps = leaf_help(cls())
    for key, hint in leaf_types(cls).items():
        def parse(text, key=key, hint=hint):
            try:
                return coerce(text, hint, key)
            except TypeError as err:
                raise argparse.ArgumentTypeError(str(err)) from None
        parse.__name__ = getattr(hint, "__name__", str(hint))
        flag = {"nargs": "?", "const": True} if hint is bool else {}  # a bare --log.wandb is true
        group.add_argument(f"--{key}", dest=key, type=parse, default=argparse.SUPPRESS,
                           metavar=key.rsplit(".", 1)[-1].upper(), help=helps[key], **flag)
    return parser


def config_from_args(args: argparse.Namespace, cls=RunConfig):
    """The config described by parsed ``add_config_arguments`` flags (``--config`` then flags)."""
    keys = leaf_types(cls)
    overrides = {k: v for k, v in vars(args).items() if k in keys}
    return load_config(getattr(args, "config", None), overrides, cls=cls)
