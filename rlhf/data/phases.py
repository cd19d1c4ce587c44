"""Blending sources and splitting them between the three training steps, like DeepSpeed-Chat.

Each source is shuffled with the seed and cut into three parts in the ``data_split`` ratio
("2,4,4": 20% sft, 40% rm, 40% rl), so no record is seen by two steps. Each step then keeps from
its part of every source the records it can use:

- ``sft``: prompt + response, or prompt + chosen as the response when there is no response;
- ``rm``: prompt + chosen + rejected;
- ``rl``: the prompt of any record.

A held-out eval share (``eval_fraction``) is taken per source, then the train records of all
sources are shuffled together. The result depends only on the sources, the split and the seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from rlhf.config import parse_data_split
from rlhf.data.formats import normalize_records, record_formats
from rlhf.data.sources import load_source

PHASES = ("sft", "rm", "rl")
_STEP_NAMES = {"sft": "the SFT step", "rm": "the reward model step", "rl": "the RL step"}
_NEEDS = {"sft": "SFT (prompt + response or chosen)", "rm": "pairwise (prompt, chosen, rejected)",
          "rl": "prompt"}


@dataclass
class PhaseData:
    """The records of one training step: ``train`` and held-out ``eval`` lists of dicts."""
    phase: str
    train: list[dict]
    eval: list[dict]


def split_parts(records: list, ratios: tuple[float, float, float], seed: int,
                salt: str = "") -> list[list]:
    """Shuffle `records` with (seed, salt) and cut them into three parts in `ratios`.

    Boundaries are rounded cumulative shares, so the parts always cover every record once.
    """
    order = list(records)
    random.Random(f"split/{seed}/{salt}").shuffle(order)
    n, total, bounds = len(order), 0.0, [0]
    for share in ratios:
        total += share
        bounds.append(round(n * total))
    bounds[-1] = n
    return [order[bounds[i]:bounds[i + 1]] for i in range(3)]


def usable_records(records: list[dict], phase: str) -> list[dict]:
    """The records `phase` can train on, reduced to the keys it uses."""
    if phase == "sft":
        out = []
        for r in records:
            answer = r.get("response", r.get("chosen"))
            if answer is not None:
                out.append({"prompt": r["prompt"], "response": answer})
        return out
    if phase == "rm":
        return [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                for r in records if "pairwise" in record_formats(r)]
    if phase == "rl":
        return [{"prompt": r["prompt"]} for r in records]
    raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")


def _eval_count(n: int, eval_fraction: float) -> int:
    if eval_fraction <= 0 or n < 2:
        return 0
    return min(max(1, round(n * eval_fraction)), n - 1)  # keep at least one train record


def split_phase(sources, phase: str, *, data_split: str = "2,4,4",
                eval_fraction: float = 0.1, seed: int = 1234) -> PhaseData:
    """The train / eval records of `phase` from already normalised records of named sources.

    Args:
        sources: {name: records} or a list of (name, records) pairs (a name may repeat).

    Raises:
        ValueError: unknown phase, a bad data_split, or no usable records for the phase (the
            message says which step, which sources and why).
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
    pairs = list(sources.items()) if hasattr(sources, "items") else list(sources)
    if not pairs:
        raise ValueError(f"no data sources for {_STEP_NAMES[phase]}")
    ratios = parse_data_split(data_split)
    share = ratios[PHASES.index(phase)]
    if share == 0:
        raise ValueError(f"no records for {_STEP_NAMES[phase]}: data_split {data_split!r} gives "
                         f"it a share of 0")
    train, held_out, seen = [], [], {}
    for index, (name, records) in enumerate(pairs):
        part = split_parts(records, ratios, seed, f"{index}/{name}")[PHASES.index(phase)]
        usable = usable_records(part, phase)
        for r in part:
            for fmt in record_formats(r):
                seen[fmt] = seen.get(fmt, 0) + 1
        n_eval = _eval_count(len(usable), eval_fraction)
        held_out.extend(usable[len(usable) - n_eval:])
        train.extend(usable[:len(usable) - n_eval])
    if not train:
        found = ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())) or "none"
        names = [name for name, _ in pairs]
        raise ValueError(f"no {_NEEDS[phase]} records for {_STEP_NAMES[phase]} in sources "
                         f"{names} (data_split {data_split!r}; records in its part by format: "
                         f"{found})")
    random.Random(f"blend/{seed}/{phase}").shuffle(train)
    return PhaseData(phase, train, held_out)


def load_phase(phase: str, sources: list[str], *, data_split: str = "2,4,4",
               eval_fraction: float = 0.1, seed: int = 1234,
               num_synthetic: int = 2000) -> PhaseData:
    """Read and normalise every source spec, then :func:`split_phase` for `phase`."""
    loaded = [(spec, normalize_records(load_source(spec, num_synthetic=num_synthetic, seed=seed),
                                       spec)) for spec in sources]
    return split_phase(loaded, phase, data_split=data_split, eval_fraction=eval_fraction,
                       seed=seed)


def phase_data_from_config(cfg, phase: str) -> PhaseData:
    """:func:`load_phase` with the data section and seed of a ``RunConfig``."""
    d = cfg.data
    return load_phase(phase, d.sources, data_split=d.data_split, eval_fraction=d.eval_fraction,
                      seed=cfg.seed, num_synthetic=d.num_synthetic)
