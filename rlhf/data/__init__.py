"""Data layer of the trainer: sources, record formats, step splits, templates, torch datasets.

Typical use by a training step::

    phase = phase_data_from_config(cfg, "sft")
    train = SFTDataset(phase.train, tokenizer, max_seq_len=cfg.model.max_seq_len,
                       train_on_prompt=cfg.data.train_on_prompt)
    loader = DataLoader(train, batch_size=..., shuffle=True, collate_fn=train.collator())
"""
from rlhf.data.formats import normalize_record, normalize_records, record_formats
from rlhf.data.phases import (PHASES, PhaseData, load_phase, phase_data_from_config,
                              split_phase)
from rlhf.data.sources import load_source
from rlhf.data.templates import (encode_answers, encode_prompts, eos_token_id, format_prompt,
                                 pad_token_id)
from rlhf.data.tokenized import (IGNORE_INDEX, PairCollator, PairDataset, PromptCollator,
                                 PromptDataset, SFTCollator, SFTDataset, pad_sequences)

__all__ = [
    "IGNORE_INDEX", "PHASES", "PairCollator", "PairDataset", "PhaseData", "PromptCollator",
    "PromptDataset", "SFTCollator", "SFTDataset", "encode_answers", "encode_prompts",
    "eos_token_id", "format_prompt", "load_phase", "load_source", "normalize_record",
    "normalize_records", "pad_sequences", "pad_token_id", "phase_data_from_config",
    "record_formats", "split_phase",
]
