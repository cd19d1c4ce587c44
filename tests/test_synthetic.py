"""rlhf.data.synthetic: the rule score, record formats, pair ordering, determinism."""
import importlib
import statistics

import pytest

from rlhf.data import load_source
from rlhf.data.synthetic import (NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS, make_records,
                                 rule_score, synthetic_texts, vocabulary)


def score(text):
    return rule_score(["p"], [text])[0]


@pytest.mark.parametrize("text, expected", [
    ("the garden is bright and calm", 2 / 6),
    ("dark", -1.0),
    ("bright", 1.0),
    ("the river is bright but cold and gloomy", -1 / 8),
    ("the lake", 0.0),
    ("", 0.0),
    ("  \n ", 0.0),
    (" Bright,DARK!  the.", 0.0),            # punctuation and case do not matter
    ("LOVELY warm</s><pad>", 2 / 4),          # decoding leftovers count as words
])
def test_rule_score_by_hand(text, expected):
    assert score(text) == pytest.approx(expected)


def test_rule_score_is_a_reward_callable_by_name():
    module, _, name = "rlhf.data.synthetic:rule_score".partition(":")
    fn = getattr(importlib.import_module(module), name)
    assert fn(["Describe the garden.", "x"], ["bright", "dark dull"]) == [1.0, -1.0]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        fn(["a", "b"], ["bright"])


def test_word_sets_are_disjoint_lowercase_ascii():
    assert not POSITIVE_WORDS & NEGATIVE_WORDS
    assert not (POSITIVE_WORDS | NEGATIVE_WORDS) & set(NEUTRAL_WORDS)
    words = vocabulary()
    assert 150 <= len(words) <= 500
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words)


@pytest.mark.parametrize("kind, keys", [("prompt", {"prompt"}), ("sft", {"prompt", "response"}),
                                        ("pairwise", {"prompt", "chosen", "rejected"}),
                                        ("all", {"prompt", "response", "chosen", "rejected"})])
def test_kinds_and_determinism(kind, keys):
    records = make_records(50, seed=3, kind=kind)
    assert len(records) == 50 and all(set(r) == keys for r in records)
    assert make_records(50, seed=3, kind=kind) == records
    assert make_records(50, seed=4, kind=kind) != records


def test_pairs_are_ordered_by_the_rule_with_some_near_ties():
    records = make_records(1000, seed=0, kind="pairwise")
    prompts = [r["prompt"] for r in records]
    chosen = rule_score(prompts, [r["chosen"] for r in records])
    rejected = rule_score(prompts, [r["rejected"] for r in records])
    gaps = [c - r for c, r in zip(chosen, rejected)]
    assert min(gaps) > 0
    assert 0.05 < sum(g <= 1 / 8 + 1e-9 for g in gaps) / len(gaps) < 0.6  # near ties, not all


def test_sft_answers_are_neutral_and_below_chosen():
    records = make_records(2000, seed=1, kind="all")
    prompts = [r["prompt"] for r in records]
    sft = statistics.mean(rule_score(prompts, [r["response"] for r in records]))
    chosen = statistics.mean(rule_score(prompts, [r["chosen"] for r in records]))
    assert abs(sft) < 0.03 and chosen > sft + 0.1


def test_answers_describe_the_prompt_topic_in_8_to_16_words():
    for r in make_records(200, seed=2, kind="all"):
        words = r["prompt"].rstrip(".?").split()
        topic = words[words.index("the") + 1]
        for key in ("response", "chosen", "rejected"):
            words = r[key].split()
            assert 8 <= len(words) <= 16 and words[:2] == ["the", topic]


def test_texts_cover_the_vocabulary_and_the_template():
    texts = synthetic_texts(seed=0, n=100)
    seen = {w.strip(".?:").lower() for t in texts for w in t.split()}
    assert set(vocabulary()) <= seen and {"human", "assistant"} <= seen
    assert synthetic_texts(seed=0, n=100) == texts and synthetic_texts(seed=1, n=100) != texts


@pytest.mark.parametrize("kwargs, match", [({"n": 0}, "positive int"), ({"n": 2.0}, "positive int"),
                                           ({"n": 3, "kind": "dpo"}, "kind must be one of")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_records(**kwargs)


def test_synthetic_source_specs():
    assert set(load_source("synthetic:pairwise", num_synthetic=5)[0]) == {"prompt", "chosen",
                                                                          "rejected"}
    assert len(load_source("synthetic", num_synthetic=7, seed=1)) == 7
    with pytest.raises(ValueError, match="kind must be one of"):
        load_source("synthetic:bogus")
