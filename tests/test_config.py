"""rlhf.config: defaults, precedence (defaults < YAML < CLI), parsing, validation, round trip."""
import argparse

import pytest
import yaml

from rlhf.config import (RunConfig, add_config_arguments, config_from_args, load_config,
                         parse_data_split, save_config, to_dict)


def parse(argv):
    parser = add_config_arguments(argparse.ArgumentParser(prog="rlhf"))
    return parser.parse_args(argv)


def write_yaml(tmp_path, tree, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree) if not isinstance(tree, str) else tree)
    return path


def test_step3_defaults_follow_the_architecture():
    cfg = load_config()
    rl = cfg.rl
    assert (rl.kl_ctl, rl.clip_reward_value) == (0.1, 5.0)
    assert (rl.cliprange, rl.cliprange_value) == (0.2, 0.2)
    assert (rl.gamma, rl.lam, rl.actor_lr, rl.critic_lr) == (1.0, 0.95, 9.65e-6, 5e-6)
    assert (rl.enable_ema, rl.ema_beta, rl.ptx, rl.ptx_coef) == (False, 0.992, False, 27.8)
    assert rl.max_new_tokens == 256
    assert cfg.data.data_split == "2,4,4" and cfg.seed == 1234
    assert cfg.rm.lr == 5e-5 and cfg.sft.lr == 9.65e-6  # step 2 and step 1 differ
    assert cfg.deepspeed.zero_stage == 0 and cfg.model.lora_dim == 0


def test_mutable_defaults_are_not_shared():
    a, b = RunConfig(), RunConfig()
    a.data.sources.append("x.jsonl")
    a.model.lora_target_modules.clear()
    assert b.data.sources == ["synthetic"] and len(b.model.lora_target_modules) == 4


def test_precedence_default_yaml_cli(tmp_path):
    path = write_yaml(tmp_path, {"seed": 7, "rl": {"kl_ctl": 0.2, "gamma": 0.9},
                                 "model.dtype": "bf16"})
    cfg = config_from_args(parse(["--config", str(path), "--rl.kl_ctl", "0.05"]))
    assert cfg.rl.kl_ctl == 0.05          # CLI beats YAML
    assert cfg.rl.gamma == 0.9 and cfg.seed == 7 and cfg.model.dtype == "bf16"  # YAML beats default
    assert cfg.rl.lam == 0.95             # default kept
    assert config_from_args(parse([])) == load_config()


def test_flags_not_given_leave_yaml_alone(tmp_path):
    path = write_yaml(tmp_path, {"log": {"tensorboard": False}})
    args = parse(["--config", str(path), "--log.wandb"])  # a bare bool flag means true
    cfg = config_from_args(args)
    assert cfg.log.tensorboard is False and cfg.log.wandb is True


@pytest.mark.parametrize("text, expected", [("true", True), ("1", True), ("yes", True),
                                            ("false", False), ("0", False), ("No", False)])
def test_bool_flags(text, expected):
    assert config_from_args(parse(["--model.gradient_checkpointing", text])) \
        .model.gradient_checkpointing is expected


def test_bad_bool_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse(["--rl.ptx", "maybe"])
    assert "rl.ptx" in capsys.readouterr().err


def test_lists_numbers_and_none_from_cli():
    cfg = config_from_args(parse([
        "--data.sources", "a.jsonl, b.parquet", "--model.lora_target_modules", "q_proj,v_proj",
        "--deepspeed.adam_betas", "0.8,0.9", "--rl.dual_clip", "3", "--rl.max_new_tokens", "32",
        "--output", "runs/x", "--rl.algorithm", "grpo"]))
    assert cfg.data.sources == ["a.jsonl", "b.parquet"]
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.deepspeed.adam_betas == [0.8, 0.9] and cfg.rl.dual_clip == 3.0
    assert cfg.rl.max_new_tokens == 32 and cfg.output == "runs/x" and cfg.rl.algorithm == "grpo"
    assert config_from_args(parse(["--rl.dual_clip", "None"])).rl.dual_clip is None


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    path = write_yaml(tmp_path, "rl:\n  actor_lr: 1e-5\nsft:\n  epochs: 3.0\n")
    cfg = load_config(path)
    assert cfg.rl.actor_lr == 1e-5 and cfg.sft.epochs == 3 and isinstance(cfg.sft.epochs, int)


def test_overrides_nested_and_dotted():
    cfg = load_config(overrides={"rl": {"top_k": "5"}, "rl.max_new_tokens": 64})
    assert cfg.rl.top_k == 5 and cfg.rl.max_new_tokens == 64


@pytest.mark.parametrize("overrides, match", [
    ({"rl.kl_ctrl": 1}, r"'rl.kl_ctrl'.*did you mean 'rl.kl_ctl'.*valid keys in 'rl': algorithm"),
    ({"modle": {"dtype": "bf16"}}, r"'modle'.*valid keys: output, seed, max_skipped_steps, model"),
    ({"seed.value": 1}, r"'seed.value'.*'seed' is not a section"),
    ({"log": {"nope": True}}, r"unknown config key 'log.nope'"),
])
def test_unknown_keys(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(overrides=overrides)


def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'deepspeed.zero'"):
        load_config(write_yaml(tmp_path, {"deepspeed": {"zero": 3}}))


@pytest.mark.parametrize("overrides, match", [
    ({"model.lora_dim": "abc"}, r"'model.lora_dim': expected int, got 'abc'"),
    ({"model.lora_dim": 2.5}, r"'model.lora_dim': expected int"),
    ({"model.lora_dim": True}, r"'model.lora_dim': expected int"),
    ({"rl.kl_ctl": "high"}, r"'rl.kl_ctl': expected float"),
    ({"log.wandb": "maybe"}, r"'log.wandb': expected bool"),
    ({"output": ["a"]}, r"'output': expected str"),
    ({"data.sources": 3}, r"'data.sources': expected a list"),
    ({"rl": 5}, r"'rl' is a section: expected a mapping"),
])
def test_type_errors_name_the_field(overrides, match):
    with pytest.raises(TypeError, match=match):
        load_config(overrides=overrides)


@pytest.mark.parametrize("key, value, match", [
    ("rl.algorithm", "dpo", r"'rl.algorithm' must be one of ppo, grpo, rloo, reinforce"),
    ("model.dtype", "fp8", r"'model.dtype' must be one of fp32, bf16, fp16"),
    ("deepspeed.zero_stage", 4, r"'deepspeed.zero_stage' must be 0, 1, 2 or 3"),
    ("deepspeed.zero_stage", -1, r"zero_stage"),
    ("data.data_split", "2,4", r"'data.data_split' must be three"),
    ("data.data_split", "a,b,c", r"data_split"),
    ("data.data_split", "0,0,0", r"positive sum"),
    ("data.data_split", "-1,5,5", r"non-negative"),
    ("data.eval_fraction", 1.0, r"'data.eval_fraction' must be in \(0, 1\)"),
    ("data.sources", [], r"'data.sources' must name at least one source"),
    ("data.max_prompt_len", 0, r"'data.max_prompt_len' must be >= 1"),
    ("sft.scheduler", "step", r"'sft.scheduler' must be one of cosine"),
    ("rm.lr", 0, r"'rm.lr' must be > 0"),
    ("sft.max_steps", 0, r"'sft.max_steps' must be -1 or > 0"),
    ("sft.per_device_batch_size", 0, r"per_device_batch_size' must be >= 1"),
    ("rl.gamma", 1.5, r"'rl.gamma' must be in \[0, 1\]"),
    ("rl.top_p", 0.0, r"'rl.top_p' must be in \(0, 1\]"),
    ("rl.temperature", 0.0, r"'rl.temperature' must be > 0"),
    ("rl.ema_beta", 1.0, r"'rl.ema_beta'"),
    ("rl.kl_estimator", "k4", r"'rl.kl_estimator' must be one of auto, k1, k2, k3"),
    ("rl.loss_agg", "sum", r"'rl.loss_agg' must be one of token-mean"),
    ("rl.reward", "mymodule:", r"'rl.reward' must be \"\" or \"module:function\""),
    ("rl.dual_clip", 0.5, r"'rl.dual_clip' must be None or > 1"),
    ("rl.max_new_tokens", 0, r"'rl.max_new_tokens'"),
    ("model.lora_dropout", 1.0, r"'model.lora_dropout' must be < 1"),
    ("deepspeed.adam_betas", [0.9], r"'deepspeed.adam_betas' must be two numbers"),
    ("log.log_every", 0, r"'log.log_every' must be >= 1"),
    ("deepspeed.offload", True, r"'deepspeed.offload' needs deepspeed.zero_stage 1, 2 or 3"),
    ("rl.min_response_tokens", -1, r"'rl.min_response_tokens' must be >= 0"),
    ("rl.group_std_eps", -1e-4, r"'rl.group_std_eps' must be >= 0"),
    ("output", "", r"'output' must name a folder"),
])
def test_bad_values(key, value, match):
    with pytest.raises(ValueError, match=match):
        load_config(overrides={key: value})


def test_group_methods_need_a_group():
    with pytest.raises(ValueError, match=r"'rl.num_samples' must be >= 2 for rloo"):
        load_config(overrides={"rl.algorithm": "rloo", "rl.num_samples": 1})
    assert load_config(overrides={"rl.algorithm": "ppo", "rl.num_samples": 1}).rl.num_samples == 1


def test_bad_yaml_top_level(tmp_path):
    with pytest.raises(ValueError, match=r"expected a mapping at the top, got list"):
        load_config(write_yaml(tmp_path, "- 1\n- 2\n"))
    assert load_config(write_yaml(tmp_path, "", "empty.yaml")) == load_config()


def test_save_load_round_trip(tmp_path):
    cfg = load_config(overrides={"rl.algorithm": "rloo", "rl.dual_clip": 2.5, "seed": 3,
                                 "data.sources": ["synthetic", "x.jsonl"], "rm.model_path": "m",
                                 "deepspeed.offload": True, "deepspeed.zero_stage": 2,
                                 "model.lora_dim": 8})
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert to_dict(again)["rl"]["algorithm"] == "rloo"
    assert yaml.safe_load(path.read_text())["model"]["lora_dim"] == 8


def test_parse_data_split_normalises():
    assert parse_data_split("2,4,4") == pytest.approx((0.2, 0.4, 0.4))
    assert parse_data_split("10,0,0") == (1.0, 0.0, 0.0)


def test_help_lists_flags_with_their_section_defaults():
    text = add_config_arguments(argparse.ArgumentParser()).format_help()
    assert "--rl.kl_ctl" in text and "--config" in text
    assert "(default 5e-05)" in text and "(default 9.65e-06)" in text


# ---------------------------------------------------------------------------- coverage

def _sections():
    """(section name, dataclass) of every config section, the top level as ""."""
    import dataclasses
    out = [("", RunConfig)]
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(getattr(RunConfig(), f.name)):
            out.append((f.name, type(getattr(RunConfig(), f.name))))
    return out


def _names_read_outside_config():
    """Every attribute read and every string constant in rlhf/ except config.py: a field is
    read as `section.field` or by name (getattr, RLHParams' field-by-field copy)."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "rlhf"
    names = set()
    for path in root.rglob("*.py"):
        if path.name == "config.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return names


def test_every_config_field_is_read_by_the_code():
    import dataclasses
    read = _names_read_outside_config()
    unread = [f"{section + '.' if section else ''}{f.name}" for section, cls in _sections()
              for f in dataclasses.fields(cls)
              if not dataclasses.is_dataclass(f.type) and f.name not in read
              and f.name not in {"model", "data", "deepspeed", "sft", "rm", "rl", "log"}]
    assert unread == []


# sections that share a field name but differ on purpose, each with its reason
DELIBERATE_DIFFERENCES = {
    "lr": "DeepSpeed-Chat's step 1 (9.65e-6), step 2 (5e-5) and step 3 (actor_lr) rates",
    "warmup": "DeepSpeed-Chat warms up 100 steps in step 3 only",
}


def test_no_two_sections_define_the_same_default_differently():
    import dataclasses
    defaults = {}
    for section, _ in _sections()[1:]:
        for f in dataclasses.fields(getattr(RunConfig(), section)):
            defaults.setdefault(f.name, {})[section] = getattr(getattr(RunConfig(), section),
                                                               f.name)
    clashes = {name: by_section for name, by_section in defaults.items()
               if len({repr(v) for v in by_section.values()}) > 1
               and name not in DELIBERATE_DIFFERENCES}
    assert clashes == {}


def test_the_algorithm_and_engine_defaults_are_the_config_defaults():
    import dataclasses
    import inspect

    from rlhf.algorithms import RLHParams
    from rlhf.engine import make_ds_config
    rl = RunConfig().rl
    for f in dataclasses.fields(RLHParams):
        assert f.default == getattr(rl, f.name), f.name
    ds, params = RunConfig().deepspeed, inspect.signature(make_ds_config).parameters
    for kwarg, field in (("stage", "zero_stage"), ("offload", "offload"),
                         ("torch_adam", "torch_adam"), ("gradient_clipping", "gradient_clipping"),
                         ("betas", "adam_betas")):
        assert list(params[kwarg].default) == getattr(ds, field) if kwarg == "betas" \
            else params[kwarg].default == getattr(ds, field), kwarg


def test_kl_estimator_and_num_samples_are_per_algorithm():
    from rlhf.algorithms import RLHParams, get_algorithm
    cfg = load_config()
    assert cfg.rl.kl_estimator == "auto" and cfg.rl.num_samples is None
    hp = RLHParams.from_config(cfg.rl)
    chosen = {name: (get_algorithm(name).kl_estimator(hp),
                     get_algorithm(name).samples_per_prompt(hp))
              for name in ("ppo", "grpo", "rloo", "reinforce")}
    assert chosen == {"ppo": ("k1", 1), "grpo": ("k3", 4), "rloo": ("k1", 4),
                      "reinforce": ("k1", 1)}
    with pytest.raises(ValueError, match="'rl.num_samples' must be >= 2 for grpo"):
        load_config(overrides={"rl.algorithm": "grpo", "rl.num_samples": 1})


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1])
def test_eval_fraction_must_leave_a_held_out_share(value):
    # 0 used to pass here and fail later with "no records for the SFT dataset"
    with pytest.raises(ValueError, match=r"'data.eval_fraction' must be in \(0, 1\): each step "
                                         r"evaluates on its held-out share"):
        load_config(overrides={"data.eval_fraction": value})


def test_reward_help_says_the_spec_is_code():
    parser = add_config_arguments(argparse.ArgumentParser())
    text = " ".join(parser.format_help().split())
    assert "module:function\" (code: the module is imported and run; the current folder is " \
           "importable, as under python -m)" in text


def test_close_key_finds_a_typo_or_the_field_in_another_section():
    from rlhf.config_tree import close_key, leaf_types
    keys = leaf_types(RunConfig)
    assert close_key("rl.kl_ctll", keys) == "rl.kl_ctl"
    assert close_key("ppo.cliprange_value", keys) == "rl.cliprange_value"
    assert close_key("zzzz.qqqq", keys) is None
