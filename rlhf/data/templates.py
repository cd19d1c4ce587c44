"""Turning a prompt and an answer into token ids, the same way for training and generation.

The prompt is rendered with the tokenizer's chat template when it has one, else as
"Human: {prompt} Assistant:". The answer follows as is, then the EOS token. Prompt and answer are
tokenised separately, so the prompt ids of a training example are exactly the ids the actor is
given at generation time.
"""
from __future__ import annotations

PLAIN_TEMPLATE = "Human: {prompt} Assistant:"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as text ready for the answer to follow."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
    return PLAIN_TEMPLATE.format(prompt=prompt)


def eos_token_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token (answers end "
                         "with it and generation stops at it)")
    return int(eos)


def pad_token_id(tokenizer) -> int:
    """tokenizer.pad_token_id, or the EOS id when there is no pad token."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else eos_token_id(tokenizer)


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of the formatted prompts (special tokens such as BOS included once)."""
    texts = [format_prompt(tokenizer, p) for p in prompts]
    # a chat template already writes its own special tokens (BOS included) as text
    ids = tokenizer(texts, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    return [list(x) for x in ids]


def encode_answers(tokenizer, answers: list[str]) -> list[list[int]]:
    """Token ids of the answers as written, each followed by EOS."""
    eos = eos_token_id(tokenizer)
    ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    return [list(x) + [eos] for x in ids]
