"""Bad inputs through the trainer's entry points: each stops with an error that says what is
wrong and where, or (over-long prompts) is dropped and counted in the log."""
import json
import logging
import re

import pytest
from trainer_support import one_torch_thread, tiny_config  # noqa: F401

from rlhf.cli import main
from rlhf.data import phase_data_from_config
from rlhf.data.templates import encode_prompts
from rlhf.trainers.rl import run_rl
from rlhf.trainers.setup import load_base
from rlhf.trainers.sft import run_sft

# RL straight from the tiny random model, scored by a callable: no SFT or reward model needed
CALLABLE_RL = {"rl.algorithm": "reinforce", "rl.reward": "rlhf.data.synthetic:rule_score",
               "rl.kl_ctl": 0.0, "rl.steps": 1}


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _records(n):
    return [json.dumps({"prompt": f"Describe place {i}.", "response": "A calm bright place."})
            for i in range(n)]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", _records(2) + ['{"prompt": "cut off'] + _records(3))
    with pytest.raises(ValueError, match=re.escape(f"{data}:3: malformed JSON line")):
        run_sft(tiny_config(tmp_path / "out", {"data.sources": [str(data)]}))


def test_jsonl_line_that_is_not_an_object_names_file_and_line(tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", _records(4) + ['["a", "list"]'])
    with pytest.raises(ValueError, match=re.escape(f"{data}:5: expected a JSON object, got list")):
        run_sft(tiny_config(tmp_path / "out", {"data.sources": [str(data)]}))


def test_empty_dataset_is_refused(tmp_path):
    data = _write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=re.escape(f"data source {str(data)!r} has no records")):
        run_sft(tiny_config(tmp_path / "out", {"data.sources": [str(data)]}))


def test_dataset_without_records_for_the_step_says_which_step(tmp_path):
    prompts_only = [json.dumps({"prompt": f"Describe place {i}."}) for i in range(50)]
    data = _write_jsonl(tmp_path / "prompts.jsonl", prompts_only)
    with pytest.raises(ValueError, match=r"no SFT \(prompt \+ response or chosen\) records for "
                                         r"the SFT step.*prompt: \d+"):
        run_sft(tiny_config(tmp_path / "out", {"data.sources": [str(data)]}))


def test_dataset_too_small_for_one_batch(tmp_path):
    data = _write_jsonl(tmp_path / "small.jsonl", _records(20))  # 20% for SFT: 4 records
    with pytest.raises(ValueError, match=r"\d+ records cannot fill one batch of 8 x 1 ranks"):
        run_sft(tiny_config(tmp_path / "out", {"data.sources": [str(data)]}))


def test_prompts_longer_than_max_prompt_len_are_dropped_and_counted(tmp_path, caplog):
    cfg = tiny_config(tmp_path, CALLABLE_RL)
    tokenizer, _ = load_base(cfg, "tiny")
    prompts = [r["prompt"] for r in phase_data_from_config(cfg, "rl").train]
    lengths = sorted(len(ids) for ids in encode_prompts(tokenizer, prompts))
    limit = lengths[len(lengths) // 2]  # about half the prompts are longer
    too_long = sum(n > limit for n in lengths)
    assert 0 < too_long < len(lengths)
    cfg.data.max_prompt_len = limit
    with caplog.at_level(logging.WARNING):
        result = run_rl(cfg)
    assert f"dropped {too_long} of {len(lengths)} prompts longer than {limit} tokens" in caplog.text
    assert result["iterations"] == 1


def test_prompts_all_too_long_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"all \d+ prompts are longer than 1 tokens"):
        run_rl(tiny_config(tmp_path, {**CALLABLE_RL, "data.max_prompt_len": 1}))


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_for_rlhf_tests:score",
     "cannot import module 'no_such_module_for_rlhf_tests' of reward function"),
    ("rlhf.data.synthetic:no_such_function", "module 'rlhf.data.synthetic' has no attribute"),
    ("rlhf.data.synthetic:POSITIVE_WORDS", "is a frozenset, not a callable"),
])
def test_reward_function_that_cannot_be_loaded(tmp_path, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run_rl(tiny_config(tmp_path, {**CALLABLE_RL, "rl.reward": spec}))


def test_reward_spec_without_a_colon_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match=re.escape('rl.reward\' must be "" or "module:function"')):
        tiny_config(tmp_path, {**CALLABLE_RL, "rl.reward": "rule_score"})


@pytest.mark.parametrize("body, message", [
    ("return [0.0]", r"returned 1 scores for 4 responses"),
    ("return [float('nan')] * len(responses)", r"returned a non-finite score at index 0"),
    ("return 'high'", r"must return a sequence of 4 numbers, got str"),
])
def test_reward_function_with_a_wrong_answer(tmp_path, monkeypatch, body, message):
    module = f"rewards_{tmp_path.name}"  # a new module per case: imports are cached
    (tmp_path / f"{module}.py").write_text(f"def score(prompts, responses):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_config(tmp_path / "out", {**CALLABLE_RL, "rl.reward": f"{module}:score",
                                         "rl.generation_batch_size": 4})
    with pytest.raises(ValueError, match=f"reward function {module}:score {message}"):
        run_rl(cfg)


def test_ppo_without_a_reward_model_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"rm/value_head.safetensors not found.*"
                                                r"not a saved value model"):
        run_rl(tiny_config(tmp_path, {"rl.algorithm": "ppo"}))


@pytest.mark.parametrize("argv, message", [
    (["sft", "--rl.no_such_key", "1"], "unrecognized arguments: --rl.no_such_key"),
    (["ppo", "--no_such_section.kl_ctl", "1"], "unrecognized arguments: --no_such_section.kl_ctl"),
    (["rm", "--rl.kl_ctl", "lots"], "argument --rl.kl_ctl: config key 'rl.kl_ctl': expected float"),
    (["sft", "--rl.cliprange", "-1"], "config key 'rl.cliprange' must be > 0, got -1.0"),
    (["pipeline", "--deepspeed.zero_stage", "4"], "config key 'deepspeed.zero_stage' must be 0"),
])
def test_bad_cli_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: rlhf") and message in err


@pytest.mark.parametrize("command", ["sft", "demo"])
def test_unknown_key_in_a_yaml_config_is_an_argparse_error(tmp_path, capsys, command):
    config = tmp_path / "run.yaml"
    config.write_text("rl:\n  kl_ctll: 0.05\n")
    with pytest.raises(SystemExit) as stop:
        main([command, "--config", str(config), "--output", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "unknown config key 'rl.kl_ctll' (did you mean 'rl.kl_ctl'?)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_a_byte_that_is_not_utf8_names_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes("".join(line + "\n" for line in _records(3)).encode()
                     + b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{data}:4: not UTF-8 text (byte 0xe9")):
        run_sft(tiny_config(tmp_path / "out", {"data.sources": [str(data)]}))


def test_a_byte_that_is_not_utf8_in_a_json_file_names_its_line(tmp_path):
    data = tmp_path / "train.json"
    data.write_bytes(b'[{"prompt": "a",\n  "response": "caf\xe9"}]')
    with pytest.raises(ValueError, match=re.escape(f"{data}:2: not UTF-8 text (byte 0xe9, byte "
                                                   f"19 of the line)")):
        run_sft(tiny_config(tmp_path / "out", {"data.sources": [str(data)]}))


@pytest.mark.parametrize("name", ["./no_such_model", "no_such_dir/a/b", "~/no_such_model_rlhf"])
def test_a_local_model_path_that_does_not_exist_says_so(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"model path {name} does not exist (model.name_or_path)")):
        run_sft(tiny_config(tmp_path / "out", {"model.name_or_path": name}))


def test_a_path_under_an_existing_folder_is_a_path_not_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(
            "model path runs/sft does not exist (model.tokenizer)")):
        run_sft(tiny_config(tmp_path / "out", {"model.name_or_path": "runs/sft",
                                               "model.tokenizer": "runs/sft"}))


def test_hub_names_are_not_taken_for_paths():
    from rlhf.models.loading import _looks_like_path
    assert not any(map(_looks_like_path, ["gpt2", "HuggingFaceTB/SmolLM2-135M", "org/m.v-1_2"]))
    assert all(map(_looks_like_path, ["/abs/x", "./x", "../x", "~/x", "a/b/c", "a b", "a/../b"]))


@pytest.mark.parametrize("scheduler", ["cosine", "linear"])
def test_warmup_longer_than_the_run_names_the_setting(tmp_path, scheduler):
    with pytest.raises(ValueError, match=re.escape(
            "sft.warmup = 50 >= the 3 optimizer steps of this run: lower sft.warmup or raise "
            "sft.max_steps / sft.epochs")):
        run_sft(tiny_config(tmp_path, {"sft.warmup": 50, "sft.scheduler": scheduler}))


def test_rl_warmup_longer_than_the_run_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"rl.warmup = 50 >= the \d+ optimizer steps of this run: "
                                         r"lower rl.warmup or raise rl.steps / rl.epochs"):
        run_rl(tiny_config(tmp_path, {**CALLABLE_RL, "rl.warmup": 50}))


def test_constant_schedule_with_a_long_warmup_warns(caplog):
    from rlhf.trainers.setup import check_warmup
    with caplog.at_level(logging.WARNING):
        check_warmup("rm.warmup", 5, 3, "constant")
        check_warmup("rm.warmup", 3, 3, "constant")  # the last step reaches the peak
        check_warmup("rm.warmup", 2, 3, "cosine")
    assert caplog.text.count("rm.warmup = 5 >= the 3 optimizer steps") == 1
    assert "never reaches its peak" in caplog.text
