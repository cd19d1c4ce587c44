"""The demo's synthetic task: describe a place, with a known preference for positive words.

Rule score of a response = (positive words - negative words) / words, in [-1, 1]. A reward
model can learn it from pairs, and RL can be seen to raise it, even with a tiny random model and
a tokenizer trained on the fly from :func:`synthetic_texts` (a few hundred lowercase words).
"""
from __future__ import annotations

import random
import re

TOPICS = (
    "garden river city kitchen forest village market harbor library school beach mountain "
    "valley station bridge castle farm meadow lake island desert street park museum tower "
    "church bakery office hospital theater"
).split()

POSITIVE_WORDS = frozenset((
    "bright calm kind lovely warm gentle joyful pleasant fresh clean friendly wonderful happy "
    "cheerful peaceful sunny sweet graceful delightful lively charming cozy beautiful radiant "
    "hopeful serene splendid tidy welcoming glad"
).split())

NEGATIVE_WORDS = frozenset((
    "dark cold cruel ugly gloomy harsh bitter dirty noisy broken sad angry awful grim dull "
    "rotten nasty dreary hostile bleak filthy gray miserable smelly shabby tense empty rough "
    "sour lonely"
).split())

NEUTRAL_WORDS = tuple((
    "the a an is was are were and with of in on near under over by at to from it its there "
    "this that these some many few most every old new small large tall short round long wide "
    "narrow red blue green yellow white brown stone wooden glass metal path wall window door "
    "roof tree trees light water people children visitors morning evening night day week "
    "season summer winter spring autumn road corner side edge center view sound smell air "
    "building houses shops boats birds flowers grass hills rocks sand bench table chairs "
    "books bread fish stalls bells lamps stairs gate fence field sky clouds rain wind sun "
    "seems looks feels stands sits lies opens holds has have had usually often always also "
    "still very quite rather"
).split())

PROMPT_TEMPLATES = (
    "Describe the {}.",
    "Tell me about the {}.",
    "What is the {} like?",
    "Write a few words about the {}.",
    "How would you describe the {}?",
)

KINDS = ("prompt", "sft", "pairwise", "all")
_POSITIVE, _NEGATIVE = sorted(POSITIVE_WORDS), sorted(NEGATIVE_WORDS)
_MIN_WORDS, _MAX_WORDS = 8, 16
_NEUTRAL_SHARE = 0.4  # SFT answers: words are positive or negative with 0.3 each, symmetric


def rule_score(prompts: list[str], responses: list[str]) -> list[float]:
    """The task's reward: (positive - negative word count) / word count per response.

    Words are the runs of ASCII letters after lowercasing, so extra spaces, punctuation and
    special tokens left over from decoding do not change the score. An empty response scores 0.
    `prompts` are accepted for the reward-callable signature and only checked for length.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"rule_score: {len(prompts)} prompts but {len(responses)} responses")
    return [_score_words(_words(text)) for text in responses]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", str(text).lower())


def _score_words(words: list[str]) -> float:
    if not words:
        return 0.0
    balance = sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)
    return balance / len(words)


def _prompt(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(TOPICS)
    return topic, rng.choice(PROMPT_TEMPLATES).format(topic)


def _response(rng: random.Random, topic: str, p_positive: float, p_negative: float) -> str:
    """'the <topic> ...' then words that are positive / negative with the given probabilities."""
    words = ["the", topic]
    for _ in range(rng.randint(_MIN_WORDS, _MAX_WORDS) - 2):
        u = rng.random()
        if u < p_positive:
            words.append(rng.choice(_POSITIVE))
        elif u < p_positive + p_negative:
            words.append(rng.choice(_NEGATIVE))
        else:
            words.append(rng.choice(NEUTRAL_WORDS))
    return " ".join(words)


def _neutral_response(rng: random.Random, topic: str) -> str:
    share = (1 - _NEUTRAL_SHARE) / 2
    return _response(rng, topic, share, share)


def _near_tie(rng: random.Random, text: str) -> str:
    """`text` with one word made one step worse (positive->neutral or neutral->negative)."""
    words = text.split()
    spots = [i for i, w in enumerate(words[2:], 2) if w not in NEGATIVE_WORDS]
    i = rng.choice(spots)
    words[i] = rng.choice(NEUTRAL_WORDS if words[i] in POSITIVE_WORDS else _NEGATIVE)
    return " ".join(words)


def _pair(rng: random.Random, topic: str) -> tuple[str, str]:
    """(chosen, rejected) with a strictly higher rule score for chosen; about 1 in 5 near ties."""
    while True:
        if rng.random() < 0.2:
            a = _neutral_response(rng, topic)
            if any(w not in NEGATIVE_WORDS for w in a.split()[2:]):
                b = _near_tie(rng, a)
            else:
                continue
        else:
            # each answer gets its own tilt, so pairs range from clear to subtle
            a, b = (_response(rng, topic, p, 0.6 - p)
                    for p in (rng.uniform(0.0, 0.6), rng.uniform(0.0, 0.6)))
        sa, sb = _score_words(a.split()), _score_words(b.split())
        if sa != sb:
            return (a, b) if sa > sb else (b, a)


def make_records(n: int, seed: int = 0, kind: str = "all") -> list[dict]:
    """`n` synthetic records of one format, the same for the same (n, seed, kind).

    Args:
        kind: "prompt" -> {"prompt"}; "sft" -> {"prompt", "response"} (a neutral mix, so SFT does
            not already maximise the rule); "pairwise" -> {"prompt", "chosen", "rejected"} with
            rule(chosen) > rule(rejected); "all" -> every key, usable by every training step.
    """
    if kind not in KINDS:
        raise ValueError(f"make_records: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"make_records: n must be a positive int, got {n!r}")
    rng = random.Random(f"synthetic/{seed}/{kind}")
    records = []
    for _ in range(n):
        topic, prompt = _prompt(rng)
        record = {"prompt": prompt}
        if kind in ("sft", "all"):
            record["response"] = _neutral_response(rng, topic)
        if kind in ("pairwise", "all"):
            record["chosen"], record["rejected"] = _pair(rng, topic)
        records.append(record)
    return records


def vocabulary() -> list[str]:
    """Every word the task can produce (prompts and responses), sorted."""
    prompt_words = {w for t in PROMPT_TEMPLATES for w in _words(t)}
    return sorted(set(TOPICS) | POSITIVE_WORDS | NEGATIVE_WORDS | set(NEUTRAL_WORDS) | prompt_words)


def synthetic_texts(seed: int = 0, n: int = 2000) -> list[str]:
    """A corpus for training the demo tokenizer: every word at least once, then dialogues.

    The dialogues use the plain "Human: ... Assistant: ..." template so its markers are learnt too.
    """
    rng = random.Random(f"synthetic-texts/{seed}")
    texts = [" ".join(vocabulary()), "Human: Assistant:", " ".join(PROMPT_TEMPLATES)]
    for record in make_records(n, seed, "all"):
        answer = record[rng.choice(("response", "chosen", "rejected"))]
        texts.append(f"Human: {record['prompt']} Assistant: {answer}")
    return texts
