"""rlhf.rewards: loading "module:function" reward functions and checking what they return."""
import math
import textwrap

import numpy as np
import pytest
import torch

from rlhf.rewards import load_reward_fn, score_with_fn

MODULE = textwrap.dedent("""
    def length_reward(prompts, responses):
        return [len(r) - len(p) for p, r in zip(prompts, responses)]

    class Rules:
        @staticmethod
        def shout(prompts, responses):
            return [float(r.isupper()) for r in responses]

    NOT_CALLABLE = 3
""")


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "demo_rewards_mod.py").write_text(MODULE)
    (tmp_path / "broken_rewards_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "demo_rewards_mod"


def test_load_function_and_dotted_attribute(reward_module):
    fn = load_reward_fn(f"{reward_module}:length_reward")
    assert fn(["ab"], ["abcde"]) == [3]
    shout = load_reward_fn(f"{reward_module}:Rules.shout")
    assert shout(["p", "p"], ["HEY", "hey"]) == [1.0, 0.0]
    assert load_reward_fn("math:fsum") is math.fsum


@pytest.mark.parametrize("spec", ["no_colon", "a:b:c", ":fn", "mod:", 42])
def test_malformed_spec(spec):
    with pytest.raises(ValueError, match="module:function"):
        load_reward_fn(spec)


def test_missing_module_names_it_and_the_error():
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_module_abc'.*ModuleNotFoundError"):
        load_reward_fn("no_such_module_abc:fn")


def test_module_failing_at_import(reward_module):
    with pytest.raises(ValueError, match=r"'broken_rewards_mod'.*no_such_dependency_xyz"):
        load_reward_fn("broken_rewards_mod:fn")


def test_missing_or_uncallable_attribute(reward_module):
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_reward_fn(f"{reward_module}:nope")
    with pytest.raises(ValueError, match="has no attribute 'Rules.whisper'"):
        load_reward_fn(f"{reward_module}:Rules.whisper")
    with pytest.raises(ValueError, match="int, not a callable"):
        load_reward_fn(f"{reward_module}:NOT_CALLABLE")


@pytest.mark.parametrize("result", [
    [1, 2.5, -3], (1, 2.5, -3), np.array([1, 2.5, -3]), torch.tensor([1, 2.5, -3], dtype=torch.float64),
    [np.float32(1), np.int64(2) + 0.5, -3],
])
def test_score_accepts_number_sequences(result):
    scores = score_with_fn(lambda p, r: result, ["a", "b", "c"], ["x", "y", "z"])
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores.tolist() == [1.0, 2.5, -3.0]


def test_score_passes_lists_in_order(reward_module):
    fn = load_reward_fn(f"{reward_module}:length_reward")
    scores = score_with_fn(fn, ("a", "abc"), ("abcd", "a"))
    assert scores.tolist() == [3.0, -2.0]


@pytest.mark.parametrize("result, match", [
    ([1.0, 2.0], "returned 2 scores for 3 responses"),
    ([1.0, float("nan"), 2.0], "non-finite score at index 1"),
    ([1.0, 2.0, float("inf")], "non-finite score at index 2"),
    ([1.0, "2", 3.0], "non-number at index 1"),
    ([True, 1.0, 0.0], "non-number at index 0"),
    ([[1.0], [2.0], [3.0]], "non-number at index 0"),
    (None, "sequence of 3 numbers, got NoneType"),
    (1.5, "sequence of 3 numbers, got float"),
    ("abc", "sequence of 3 numbers, got str"),
    (torch.zeros(3, 1), r"shape \(3, 1\)"),
])
def test_score_rejects_bad_results(result, match):
    def reward(prompts, responses):
        return result

    with pytest.raises(ValueError, match=match) as err:
        score_with_fn(reward, ["a", "b", "c"], ["x", "y", "z"])
    assert "reward" in str(err.value)  # the message names the function


def test_score_needs_matching_lengths():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_with_fn(lambda p, r: [0.0], ["a", "b"], ["x"])
