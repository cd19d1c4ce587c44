"""Normalising raw records to the three formats the training steps use.

- prompt-only: ``{"prompt"}``
- SFT: ``{"prompt", "response"}``
- pairwise: ``{"prompt", "chosen", "rejected"}``

A record may carry both a response and a pair (e.g. Dahoas/rm-static); every step then takes
what it can use. Common column names are accepted (see PROMPT_KEYS / RESPONSE_KEYS), as are
Anthropic-HH-style transcripts: full-text "chosen" / "rejected" without a prompt, which are split
at the last "\\n\\nAssistant:".
"""
from __future__ import annotations

PROMPT_KEYS = ("prompt", "question", "query", "instruction")
RESPONSE_KEYS = ("response", "answer", "completion", "output")
HUMAN_MARK, ASSISTANT_MARK = "\n\nHuman:", "\n\nAssistant:"


def record_formats(record: dict) -> set[str]:
    """Which formats a normalised record can serve: always "prompt", plus "sft" / "pairwise"."""
    formats = {"prompt"}
    if "response" in record:
        formats.add("sft")
    if "chosen" in record:
        formats.add("pairwise")
    return formats


def normalize_record(raw: dict, source: str = "<records>", index: int | None = None) -> dict:
    """One raw record as ``{"prompt", ["response"], ["chosen", "rejected"]}`` (strings).

    Raises:
        ValueError: naming the source, the record index and the keys seen, when no prompt can be
            found, a pair is incomplete, or a used field is not a non-empty string.
    """
    where = f"data source {source!r}" + (f", record {index}" if index is not None else "")
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")

    def text(key: str) -> str | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        return value if value.strip() else None

    prompt = next((p for p in map(text, PROMPT_KEYS[:3]) if p is not None), None)
    if prompt is None and text("instruction") is not None:
        extra = text("input")  # Alpaca-style: the instruction, then its input
        prompt = text("instruction") + (f"\n\n{extra}" if extra else "")
    chosen, rejected = text("chosen"), text("rejected")
    if (chosen is None) != (rejected is None):
        have, miss = ("chosen", "rejected") if chosen is not None else ("rejected", "chosen")
        raise ValueError(f"{where}: has {have!r} but no {miss!r}; keys seen: {sorted(raw)}")
    if prompt is None and chosen is not None and ASSISTANT_MARK in chosen:
        prompt, chosen, rejected = split_transcript_pair(chosen, rejected, where)
    if prompt is None:
        raise ValueError(f"{where}: no prompt; expected one of {', '.join(PROMPT_KEYS)} or an "
                         f"HH-style 'chosen'/'rejected' transcript; keys seen: {sorted(raw)}")
    record = {"prompt": prompt}
    response = next((r for r in map(text, RESPONSE_KEYS) if r is not None), None)
    if response is not None:
        record["response"] = response
    if chosen is not None:
        record["chosen"], record["rejected"] = chosen, rejected
    return record


def normalize_records(raws: list[dict], source: str = "<records>") -> list[dict]:
    """normalize_record over a list; errors name `source` and the record index."""
    return [normalize_record(r, source, i) for i, r in enumerate(raws)]


def _strip_human(prompt: str) -> str:
    """A transcript prompt without its first "Human:" marker, so templates can wrap it."""
    prompt = prompt.strip()
    head = HUMAN_MARK.strip()
    return prompt[len(head):].strip() if prompt.startswith(head) else prompt


def split_transcript_pair(chosen: str, rejected: str,
                          where: str = "record") -> tuple[str, str, str]:
    """HH-style full transcripts -> (prompt, chosen answer, rejected answer).

    The prompt is everything up to the last "\\n\\nAssistant:" of `chosen`, without its leading
    "Human:" marker (earlier turns stay inside as text). `rejected` is cut at the same place when
    it shares that prefix, else at its own last "\\n\\nAssistant:".
    """
    cut = chosen.rindex(ASSISTANT_MARK)
    prefix = chosen[:cut + len(ASSISTANT_MARK)]
    if rejected.startswith(prefix):
        rejected_answer = rejected[len(prefix):]
    elif ASSISTANT_MARK in rejected:
        rejected_answer = rejected[rejected.rindex(ASSISTANT_MARK) + len(ASSISTANT_MARK):]
    else:
        raise ValueError(f"{where}: 'chosen' is an HH-style transcript but 'rejected' has no "
                         f"{ASSISTANT_MARK.strip()!r} turn")
    chosen_answer = chosen[len(prefix):].strip()
    rejected_answer = rejected_answer.strip()
    if not chosen_answer or not rejected_answer:
        raise ValueError(f"{where}: HH-style transcript with an empty final answer")
    return _strip_human(chosen[:cut]), chosen_answer, rejected_answer
