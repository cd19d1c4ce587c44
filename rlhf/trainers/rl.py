"""Step 3, RL: the actor learns from rollouts scored by the reward (PPO, GRPO, RLOO, REINFORCE).

    for each iteration:
        rollout     prompts -> hybrid engine -> responses + behaviour log-probs
        experience  reference log-probs, critic values, scores -> rewards -> advantages
        update      ppo_epochs x minibatches: actor (and critic) losses on rlhf_kernels
    eval:  mean reward and KL to the reference on held-out prompts (fixed sampling seed)
"""
from __future__ import annotations

import logging
import time

import torch

from ..algorithms import (RLHParams, get_algorithm, make_experience, response_logprobs,
                          train_step)
from ..data import PromptDataset, SFTDataset, load_phase, phase_data_from_config
from ..data.templates import eos_token_id, pad_token_id
from ..engine import EMA, init_eval_engine, init_train_engine
from ..engine.hybrid import HybridEngine
from ..models import ValueModel, load_causal_lm, save_pretrained_merged
from ..rewards import load_reward_fn, score_with_fn
from .checkpoint import latest_checkpoint, load_checkpoint, restore_rng, rng_state, save_checkpoint
from .setup import DTYPES, BatchOrder, collate, ds_config, load_base, step_dir, to_device, world
from .tracking import Tracker

log = logging.getLogger("rlhf")


class Scorer:
    """The reward of a rollout: a reward model's value at the last real token, or a callable
    fn(prompts, responses) on the decoded texts. `extra` callables are logged, not optimised."""

    def __init__(self, tokenizer, reward_model=None, reward_fn=None, extra=None):
        self.tokenizer, self.model, self.fn = tokenizer, reward_model, reward_fn
        self.extra = dict(extra or {})

    def responses(self, sequences, action_mask, prompt_len):
        tokens = sequences[:, prompt_len:].masked_fill(~action_mask.bool(), 0).tolist()
        lengths = action_mask.long().sum(1).tolist()
        return self.tokenizer.batch_decode([t[:n] for t, n in zip(tokens, lengths)],
                                           skip_special_tokens=True)

    @torch.no_grad()
    def __call__(self, prompts, sequences, attention_mask, action_mask):
        if self.model is not None:
            return ValueModel.score_last(self.model(sequences, attention_mask), attention_mask)
        texts = self.responses(sequences, action_mask, attention_mask.shape[1] - action_mask.shape[1])
        return score_with_fn(self.fn, prompts, texts).to(sequences.device)

    def extras(self, prompts, sequences, action_mask, prompt_len) -> dict[str, float]:
        if not self.extra:
            return {}
        texts = self.responses(sequences, action_mask, prompt_len)
        return {name: float(score_with_fn(fn, prompts, texts).mean())
                for name, fn in self.extra.items()}


def _models(cfg, algorithm):
    """actor (trainable), reference, critic (or None), scorer, tokenizer."""
    sft = step_dir(cfg, "sft")
    actor_path = sft if (sft / "config.json").exists() else cfg.model.name_or_path
    tokenizer, actor = load_base(cfg, actor_path)
    dtype = DTYPES[cfg.model.dtype]
    reference = None
    if cfg.rl.kl_ctl > 0:
        reference = (load_causal_lm(actor_path, dtype=dtype) if str(actor_path) != "tiny"
                     else load_base(cfg, "tiny", trainable=False)[1])
    rm_dir = step_dir(cfg, "rm")
    critic = None
    if algorithm.needs_critic:
        critic = ValueModel.load(cfg.rl.critic_model_path or rm_dir, dtype=dtype,
                                 gradient_checkpointing=cfg.model.gradient_checkpointing)
    if cfg.rl.reward:
        scorer = Scorer(tokenizer, reward_fn=load_reward_fn(cfg.rl.reward))
    else:
        scorer = Scorer(tokenizer, reward_model=ValueModel.load(rm_dir, dtype=dtype))
    return tokenizer, actor, reference, critic, scorer


@torch.no_grad()
def evaluate_policy(hybrid, reference, scorer, prompts, *, max_new_tokens, temperature,
                    batch_size, seed, device) -> dict[str, float]:
    """Mean reward, KL(policy || reference) per response (sum of log-ratios) and extra scores
    on held-out prompts, sampled with a fixed seed so runs compare."""
    generator = torch.Generator(device).manual_seed(seed)
    totals, n = {}, 0
    for start in range(0, len(prompts), batch_size):
        batch = collate(prompts, range(start, min(start + batch_size, len(prompts))))
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = hybrid.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                              generator=generator)
        action = out.response_mask.bool()
        full = torch.cat([mask, out.response_mask], 1)
        metrics = {"reward": scorer(batch["prompts"], out.sequences, full, action).float(),
                   "response_len": action.sum(1).float()}
        if reference is not None:
            ref = response_logprobs(reference, out.sequences, full, ids.shape[1],
                                    temperature=temperature)
            metrics["kl"] = ((out.logprobs - ref.float()) * action).sum(1)
        rows = ids.shape[0]
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value.sum())
        for name, value in scorer.extras(batch["prompts"], out.sequences, action,
                                         ids.shape[1]).items():
            totals[name] = totals.get(name, 0.0) + value * rows
        n += rows
    return {name: total / max(n, 1) for name, total in totals.items()}


def run_rl(cfg, *, resume=False, extra_scores=None):
    """Trains step 3; writes the actor to <output>/rl/actor (<output>/rl/actor_ema with EMA).
    Returns metrics: eval before / after, steps, seconds, time breakdown."""
    r = cfg.rl
    start_time = time.time()
    torch.manual_seed(cfg.seed)
    algorithm = get_algorithm(r.algorithm)
    group = r.num_samples if r.algorithm in ("grpo", "rloo") else 1
    rollouts = r.generation_batch_size * group
    hp = RLHParams.from_config(r, group_size=max(group, 1), micro_batch_size=r.train_batch_size)
    max_new = r.max_new_tokens or cfg.data.max_answer_len
    tokenizer, actor, reference, critic, scorer = _models(cfg, algorithm)
    scorer.extra.update(extra_scores or {})
    phase = phase_data_from_config(cfg, "rl")
    prompts = PromptDataset(phase.train, tokenizer, max_prompt_len=cfg.data.max_prompt_len)
    held_out = PromptDataset(phase.eval, tokenizer, max_prompt_len=cfg.data.max_prompt_len)
    order = BatchOrder(len(prompts), r.generation_batch_size, cfg.seed + 2)
    iterations = order.per_epoch * r.epochs if r.steps < 0 else r.steps
    updates = iterations * r.ppo_epochs * max(rollouts // r.train_batch_size, 1) // r.grad_accum
    common = dict(micro_batch=r.train_batch_size, grad_accum=r.grad_accum, warmup=r.warmup,
                  total_steps=updates, scheduler=r.scheduler)
    actor_engine = init_train_engine(actor, ds_config(
        cfg, lr=r.actor_lr, weight_decay=r.actor_weight_decay, **common))
    critic_engine = None if critic is None else init_train_engine(critic, ds_config(
        cfg, lr=r.critic_lr, weight_decay=r.critic_weight_decay, **common))
    frozen = ds_config(cfg, lr=1.0, weight_decay=0.0, inference=True, **common)
    reference = None if reference is None else init_eval_engine(reference, frozen)
    if scorer.model is not None:
        scorer.model = init_eval_engine(scorer.model, frozen)
    device = actor_engine.device
    eos = [] if r.ignore_eos else eos_token_id(tokenizer)
    hybrid = HybridEngine(actor_engine, eos_token_id=eos, pad_token_id=pad_token_id(tokenizer))
    ema = EMA(actor_engine.module, r.ema_beta) if r.enable_ema else None
    ptx = None
    if r.ptx:
        ptx_data = (load_phase("sft", r.ptx_sources, seed=cfg.seed) if r.ptx_sources
                    else phase_data_from_config(cfg, "sft"))
        ptx = SFTDataset(ptx_data.train, tokenizer, max_seq_len=cfg.model.max_seq_len)
        ptx_order = BatchOrder(len(ptx), r.train_batch_size, cfg.seed + 6)
    sample_gen = torch.Generator(device).manual_seed(cfg.seed + 3)
    split_gen = torch.Generator().manual_seed(cfg.seed + 4)
    generators = {"sample": sample_gen, "split": split_gen}
    engines = {"actor": actor_engine} | ({"critic": critic_engine} if critic_engine else {})
    out = f"{cfg.output}/rl"
    state = {"iteration": 0, "history": [], "eval_before": None}
    if resume and (folder := latest_checkpoint(out)):
        state = load_checkpoint(folder, engines)
        restore_rng(state["rng"], generators)
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        elif ema is not None:
            log.warning("checkpoint %s has no EMA state: the EMA restarts from the SFT weights",
                        folder)
        log.info("resumed RL from %s at iteration %d", folder, state["iteration"])
    evaluate = dict(max_new_tokens=max_new, temperature=r.temperature,
                    batch_size=r.generation_batch_size, seed=cfg.seed + 5, device=device)
    if state["eval_before"] is None:
        state["eval_before"] = evaluate_policy(hybrid, reference, scorer, held_out, **evaluate)
    tracker = Tracker(out, f"rl-{r.algorithm}", tensorboard=cfg.log.tensorboard,
                      wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                      progress=cfg.log.progress, total=iterations, history=state["history"])
    hybrid.take_times()
    for it in range(state["iteration"], iterations):
        batch = collate(prompts, order.batch(it))
        ids = batch["input_ids"].repeat_interleave(group, 0).to(device)
        mask = batch["attention_mask"].repeat_interleave(group, 0).to(device)
        texts = [p for p in batch["prompts"] for _ in range(group)]
        gen = hybrid.generate(ids, mask, max_new_tokens=max_new, temperature=r.temperature,
                              top_k=r.top_k, top_p=r.top_p, generator=sample_gen)
        t0 = time.perf_counter()
        exp = make_experience(gen, mask, actor=actor_engine, reference=reference,
                              reward_fn=lambda s, a, m: scorer(texts, s, a, m),
                              algorithm=algorithm, hp=hp, critic=critic_engine,
                              use_behaviour_logprobs=True)
        experience_s = time.perf_counter() - t0
        ptx_batches = (None if ptx is None
                       else [to_device(collate(ptx, ptx_order.batch(it)), device)])
        with hybrid.train():
            stats = train_step(actor_engine, critic_engine, exp, algorithm, hp,
                               ptx_batches=ptx_batches, generator=split_gen)
        if ema is not None:
            ema.update(actor_engine.module)
        action = exp.action_mask.float()
        metrics = {"reward": float(exp.scores.mean()),
                   "response_len": float(action.sum(1).mean()), **stats}
        if exp.ref_logprobs is not None:
            metrics["kl"] = float(((exp.old_logprobs - exp.ref_logprobs) * action).sum(1).mean())
        metrics.update(scorer.extras(texts, exp.sequences, exp.action_mask, exp.prompt_len))
        times = hybrid.take_times()
        metrics.update({f"time_{k}": v for k, v in times.items()} | {"time_experience": experience_s})
        if r.eval_every and (it + 1) % r.eval_every == 0:
            metrics.update({f"eval_{k}": v for k, v in evaluate_policy(
                hybrid, reference, scorer, held_out, **evaluate).items()})
        tracker.log(it + 1, metrics)
        if r.save_every and (it + 1) % r.save_every == 0 and it + 1 < iterations:
            save_checkpoint(out, it + 1, engines, {
                "iteration": it + 1, "history": tracker.history, "rng": rng_state(generators),
                "eval_before": state["eval_before"],
                "ema": None if ema is None else ema.state_dict()})
    tracker.close()
    after = evaluate_policy(hybrid, reference, scorer, held_out, **evaluate)
    save_pretrained_merged(actor_engine, f"{out}/actor", tokenizer)
    if ema is not None:
        ema.copy_to(actor_engine.module)
        save_pretrained_merged(actor_engine, f"{out}/actor_ema", tokenizer)
    result = {"eval_before": state["eval_before"], "eval_after": after,
              "iterations": iterations, "seconds": time.time() - start_time,
              "generation_path": hybrid.last_path, "world_size": world()[1],
              "history": tracker.history}
    log.info("RL done: before %s after %s", state["eval_before"], after)
    return result
