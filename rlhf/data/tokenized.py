"""Torch datasets (tokenised up front) and collators for the three training steps.

Length policy: examples that do not fit are dropped, never truncated, and the count is logged
once per dataset ("dropped N of M ... longer than K tokens"). Truncating would cut the EOS off
SFT targets and make the reward model score a token in the middle of an answer.
"""
from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from rlhf.data.templates import encode_answers, encode_prompts, pad_token_id

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens without loss (torch's cross_entropy default)


def pad_sequences(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """[B, max_len] int64 tensor of `seqs` padded with `value` on `side` ("left" or "right")."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("cannot pad an empty batch")
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            start = width - len(s) if side == "left" else 0
            out[row, start:start + len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _keep_fitting(items: list, lengths: list[int], limit: int, what: str) -> list:
    kept = [item for item, n in zip(items, lengths) if n <= limit]
    dropped = len(items) - len(kept)
    if dropped:
        logger.warning("dropped %d of %d %s longer than %d tokens",
                       dropped, len(items), what, limit)
    if not kept:
        raise ValueError(f"all {len(items)} {what} are longer than {limit} tokens")
    return kept


def _check_limit(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _field(records: list[dict], key: str, kind: str) -> list[str]:
    if not records:
        raise ValueError(f"no records for the {kind} dataset")
    missing = next((i for i, r in enumerate(records) if key not in r), None)
    if missing is not None:
        raise ValueError(f"{kind} record {missing} has no {key!r}; "
                         f"keys: {sorted(records[missing])}")
    return [r[key] for r in records]


class SFTDataset(Dataset):
    """{"prompt", "response"} records -> {"input_ids", "labels"} (prompt labels are IGNORE_INDEX
    unless `train_on_prompt`); examples longer than `max_seq_len` tokens are dropped."""

    def __init__(self, records: list[dict], tokenizer, *, max_seq_len: int,
                 train_on_prompt: bool = False):
        _check_limit("max_seq_len", max_seq_len)
        prompts = encode_prompts(tokenizer, _field(records, "prompt", "SFT"))
        answers = encode_answers(tokenizer, _field(records, "response", "SFT"))
        items = []
        for p, a in zip(prompts, answers):
            labels = (p if train_on_prompt else [IGNORE_INDEX] * len(p)) + a
            items.append({"input_ids": p + a, "labels": labels})
        self.items = _keep_fitting(items, [len(x["input_ids"]) for x in items], max_seq_len,
                                   "SFT examples")
        self.pad_token_id = pad_token_id(tokenizer)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def collator(self) -> "SFTCollator":
        return SFTCollator(self.pad_token_id)


class PairDataset(Dataset):
    """{"prompt", "chosen", "rejected"} -> {"chosen_ids", "rejected_ids"} (prompt + answer + EOS);
    pairs whose longer side exceeds `max_seq_len` tokens are dropped."""

    def __init__(self, records: list[dict], tokenizer, *, max_seq_len: int):
        _check_limit("max_seq_len", max_seq_len)
        prompts = encode_prompts(tokenizer, _field(records, "prompt", "pairwise"))
        chosen = encode_answers(tokenizer, _field(records, "chosen", "pairwise"))
        rejected = encode_answers(tokenizer, _field(records, "rejected", "pairwise"))
        items = [{"chosen_ids": p + c, "rejected_ids": p + r}
                 for p, c, r in zip(prompts, chosen, rejected)]
        lengths = [max(len(x["chosen_ids"]), len(x["rejected_ids"])) for x in items]
        self.items = _keep_fitting(items, lengths, max_seq_len, "pairs")
        self.pad_token_id = pad_token_id(tokenizer)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def collator(self) -> "PairCollator":
        return PairCollator(self.pad_token_id)


class PromptDataset(Dataset):
    """{"prompt"} records -> {"input_ids", "prompt"} for generation; prompts longer than
    `max_prompt_len` tokens are dropped."""

    def __init__(self, records: list[dict], tokenizer, *, max_prompt_len: int):
        _check_limit("max_prompt_len", max_prompt_len)
        texts = _field(records, "prompt", "prompt")
        items = [{"input_ids": ids, "prompt": text}
                 for ids, text in zip(encode_prompts(tokenizer, texts), texts)]
        self.items = _keep_fitting(items, [len(x["input_ids"]) for x in items], max_prompt_len,
                                   "prompts")
        self.pad_token_id = pad_token_id(tokenizer)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def collator(self) -> "PromptCollator":
        return PromptCollator(self.pad_token_id)


def _mask(seqs: list[list[int]], side: str) -> torch.Tensor:
    return pad_sequences([[1] * len(s) for s in seqs], 0, side)


class SFTCollator:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding = IGNORE_INDEX)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        ids = [x["input_ids"] for x in batch]
        return {"input_ids": pad_sequences(ids, self.pad_token_id),
                "attention_mask": _mask(ids, "right"),
                "labels": pad_sequences([x["labels"] for x in batch], IGNORE_INDEX)}


class PairCollator:
    """One right-padded [2B, T] batch: rows 0..B-1 chosen, B..2B-1 rejected (one forward pass
    scores both), with ``attention_mask`` and ``last_index`` [2B], the position of the last
    real token, where the reward model reads its score."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [x["chosen_ids"] for x in batch] + [x["rejected_ids"] for x in batch]
        return {"input_ids": pad_sequences(seqs, self.pad_token_id),
                "attention_mask": _mask(seqs, "right"),
                "last_index": torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)}


class PromptCollator:
    """Left-padded ``input_ids`` and ``attention_mask`` (answers are appended on the right),
    plus ``prompts``: the raw prompt strings, for reward functions."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict]) -> dict:
        ids = [x["input_ids"] for x in batch]
        return {"input_ids": pad_sequences(ids, self.pad_token_id, "left"),
                "attention_mask": _mask(ids, "left"),
                "prompts": [x["prompt"] for x in batch]}
