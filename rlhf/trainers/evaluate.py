"""`rlhf eval`: each step's held-out metric on the models a run wrote.

    sft     perplexity of <output>/sft on held-out SFT records
    rm      accuracy of <output>/rm on held-out preference pairs
    policy  mean reward and KL to the SFT model of <output>/rl/actor on held-out prompts
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data import PairDataset, PromptDataset, SFTDataset, phase_data_from_config
from ..data.templates import eos_token_id, pad_token_id
from ..engine import init_distributed
from ..engine.hybrid import HybridEngine
from ..models import ValueModel, load_causal_lm, load_tokenizer
from ..rewards import load_reward_fn
from .reward import pair_accuracy
from .scoring import Scorer, evaluate_policy
from .setup import TORCH_DTYPES, step_dir
from .sft import perplexity


def evaluate_all(cfg) -> dict:
    init_distributed()
    dtype, results = TORCH_DTYPES[cfg.model.dtype], {}
    sft_dir, rm_dir = step_dir(cfg, "sft"), step_dir(cfg, "rm")
    actor_dir = Path(cfg.output) / "rl" / "actor"
    device = torch.device("cpu")
    if (sft_dir / "config.json").exists():
        tokenizer = load_tokenizer(sft_dir)
        data = phase_data_from_config(cfg, "sft").eval
        held_out = SFTDataset(data, tokenizer, max_seq_len=cfg.model.max_seq_len)
        model = load_causal_lm(sft_dir, dtype=dtype)
        results["sft_eval_perplexity"] = perplexity(model, held_out,
                                                    cfg.sft.per_device_eval_batch_size, device)
    if (rm_dir / "config.json").exists():
        tokenizer = load_tokenizer(rm_dir)
        pairs = PairDataset(phase_data_from_config(cfg, "rm").eval, tokenizer,
                            max_seq_len=cfg.model.max_seq_len)
        reward_model = ValueModel.load(rm_dir, dtype=dtype)
        results["rm_eval"] = pair_accuracy(reward_model, pairs,
                                           cfg.rm.per_device_eval_batch_size, device)
    if (actor_dir / "config.json").exists() and (rm_dir / "config.json").exists():
        tokenizer = load_tokenizer(actor_dir)
        prompts = PromptDataset(phase_data_from_config(cfg, "rl").eval, tokenizer,
                                max_prompt_len=cfg.data.max_prompt_len)
        actor = load_causal_lm(actor_dir, dtype=dtype)
        reference = load_causal_lm(sft_dir, dtype=dtype) if sft_dir.exists() else None
        scorer = (Scorer(tokenizer, reward_fn=load_reward_fn(cfg.rl.reward),
                         timeout=cfg.rl.reward_timeout) if cfg.rl.reward
                  else Scorer(tokenizer, ValueModel.load(rm_dir, dtype=dtype)))
        hybrid = HybridEngine(actor, eos_token_id=eos_token_id(tokenizer),
                              pad_token_id=pad_token_id(tokenizer))
        results["policy_eval"] = evaluate_policy(
            hybrid, reference, scorer, prompts, max_new_tokens=cfg.rl.max_new_tokens,
            temperature=cfg.rl.temperature, batch_size=cfg.rl.generation_batch_size,
            seed=cfg.seed + 5, device=device)
    if not results:
        raise ValueError(f"nothing to evaluate in {cfg.output}: no sft/, rm/ or rl/actor/ model")
    return results
