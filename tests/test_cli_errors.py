"""The `rlhf` command's errors: one line `rlhf <command>: error: <cause>` on rank 0 for the run's
own errors (exit 1; 2 for a bad flag or config; 130 interrupted), the traceback with --debug or
for a bug elsewhere; "did you mean" for an unknown flag; --overwrite reaches the steps; a reward
module beside the user's config is found by the console script."""
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_support import TINY, cli_flags, one_torch_thread, subprocess_env  # noqa: F401

from rlhf import cli
from rlhf.trainers import reward, rl, sft

FAST = {"model.name_or_path": "tiny", "log.progress": False}


def _shell(monkeypatch, *argv) -> int:
    """main() as the console script calls it: the arguments in sys.argv."""
    monkeypatch.setattr(sys, "argv", ["rlhf", *argv])
    return cli.main()


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("rlhf ")]


@pytest.mark.parametrize("argv, hint", [
    (["sft", "--rl.kl_ctll", "0.1"], "unrecognized arguments: --rl.kl_ctll 0.1 "
                                     "(did you mean --rl.kl_ctl?)"),
    (["ppo", "--ppo.kl_ctl=0.1"], "(did you mean --rl.kl_ctl?)"),  # the field, the wrong section
    (["rm", "--sft.warmpu", "3"], "(did you mean --sft.warmup?)"),
    (["pipeline", "--overwrit3"], "(did you mean --overwrite?)"),
])
def test_unknown_flag_says_did_you_mean(argv, hint, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: rlhf {argv[0]}") and len(err.splitlines()) == 2
    assert f"rlhf {argv[0]}: error: " in err and hint in err


def test_unknown_flag_without_a_close_match_has_no_hint(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sft", "--zzzzqqqq", "1"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzzzqqqq 1" in err and "did you mean" not in err


def test_a_run_error_is_one_line_naming_the_cause(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing.jsonl"
    code = _shell(monkeypatch, "sft", "--output", str(tmp_path / "out"),
                  *cli_flags({**FAST, "data.sources": str(missing)}))
    assert code == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert _error_lines(captured.err) == [
        f"rlhf sft: error: data source {str(missing)!r}: no such file"]


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        _shell(monkeypatch, "sft", "--debug", "--output", str(tmp_path / "out"),
               *cli_flags({**FAST, "data.sources": str(tmp_path / "missing.jsonl")}))


def test_called_from_python_the_error_propagates(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        cli.main(["sft", "--output", str(tmp_path / "out"),
                  *cli_flags({**FAST, "data.sources": str(tmp_path / "missing.jsonl")})])


def test_other_ranks_exit_quietly_with_the_same_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_rank", lambda: 1)
    code = _shell(monkeypatch, "sft", "--output", str(tmp_path / "out"),
                  *cli_flags({**FAST, "data.sources": str(tmp_path / "missing.jsonl")}))
    assert code == 1
    assert _error_lines(capsys.readouterr().err) == []


def test_interrupt_is_a_short_message_and_130(tmp_path, monkeypatch, capsys):
    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sft, "run_sft", interrupted)
    assert _shell(monkeypatch, "sft", "--output", str(tmp_path)) == 130
    assert _error_lines(capsys.readouterr().err) == ["rlhf sft: error: interrupted"]


def test_an_error_raised_outside_the_project_keeps_its_traceback(tmp_path, monkeypatch):
    def bug(cfg, **kwargs):  # this file is not rlhf's code: a bug shows where it is
        raise ValueError("a bug in someone else's code")
    monkeypatch.setattr(sft, "run_sft", bug)
    with pytest.raises(ValueError, match="a bug in someone else's code"):
        _shell(monkeypatch, "sft", "--output", str(tmp_path))


def test_a_config_error_is_a_usage_error(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "run.yaml"
    with pytest.raises(SystemExit) as stop:
        _shell(monkeypatch, "sft", "--config", str(missing))
    assert stop.value.code == 2
    assert _error_lines(capsys.readouterr().err) == [
        f"rlhf sft: error: [Errno 2] No such file or directory: {str(missing)!r}"]


@pytest.mark.parametrize("command, steps", [
    ("sft", ["sft"]), ("rm", ["rm"]), ("ppo", ["rl"]), ("pipeline", ["sft", "rm", "rl"])])
@pytest.mark.parametrize("flags, overwrite", [([], False), (["--overwrite"], True)])
def test_overwrite_reaches_the_steps(tmp_path, monkeypatch, capsys, command, steps, flags,
                                     overwrite):
    calls = {}

    def recorder(step):
        def run(cfg, **kwargs):
            calls[step] = kwargs
            return {"steps": 1}
        return run
    monkeypatch.setattr(sft, "run_sft", recorder("sft"))
    monkeypatch.setattr(reward, "run_rm", recorder("rm"))
    monkeypatch.setattr(rl, "run_rl", recorder("rl"))
    assert cli.main([command, "--output", str(tmp_path), *flags]) == 0
    assert calls == {step: {"resume": False, "overwrite": overwrite} for step in steps}


def test_help_names_overwrite_debug_and_that_a_reward_spec_is_code(capsys):
    with pytest.raises(SystemExit):
        cli.main(["ppo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--overwrite write into a run folder that already holds a run (default: refuse; " \
           "--resume continues it)" in text
    assert "--debug" in text
    assert "(code: the module is imported and run; the current folder is importable" in text


def test_reward_module_beside_the_config_is_found_without_pythonpath(tmp_path):
    """`python -c` with the current folder taken off sys.path, as the console script runs."""
    (tmp_path / "my_reward_cwd.py").write_text(
        "def score(prompts, responses):\n    return [len(r) for r in responses]\n")
    code = ("import os, sys\n"
            "sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]\n"
            "from rlhf.rewards import load_reward_fn\n"
            "print(load_reward_fn('my_reward_cwd:score')(['p'], ['abc']))\n"
            "assert os.getcwd() not in sys.path  # only for the import\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[3]"


def test_console_script_imports_the_reward_module_of_the_current_folder(tmp_path):
    """The installed `rlhf` script, run from the folder of my_reward.py: the module is imported
    (its import stops the run on purpose) and the error is one line."""
    script = Path(sys.executable).with_name("rlhf")
    if not script.exists():
        pytest.skip("the rlhf console script is not installed (pip install -e .)")
    (tmp_path / "my_reward.py").write_text("raise RuntimeError('my_reward was imported')\n")
    flags = cli_flags({**TINY, "rl.algorithm": "reinforce", "rl.kl_ctl": 0.0,
                       "rl.reward": "my_reward:score"})
    proc = subprocess.run([str(script), "ppo", "--output", str(tmp_path / "out"), *flags],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env=subprocess_env())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert _error_lines(proc.stderr) == [
        "rlhf ppo: error: cannot import module 'my_reward' of reward function 'my_reward:score': "
        "RuntimeError: my_reward was imported"]


def test_abbreviated_flags_are_not_taken_for_another(capsys):
    from rlhf.cli import main
    with pytest.raises(SystemExit) as info:
        main(["sft", "--overwrit", "--output", "nowhere"])
    assert info.value.code == 2
    assert "did you mean --overwrite" in capsys.readouterr().err
