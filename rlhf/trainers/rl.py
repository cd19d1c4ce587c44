"""Step 3, RL: the actor learns from rollouts scored by the reward (PPO, GRPO, RLOO, REINFORCE).

    for each iteration:
        rollout     prompts -> hybrid engine -> responses + behaviour log-probs
        filter      rollouts shorter than rl.min_response_tokens are dropped (DeepSpeed-Chat)
        experience  reference log-probs, critic values, scores -> rewards -> advantages
        update      ppo_epochs x minibatches: actor (and critic) losses on rlhf_kernels
        log, save
    eval:  mean reward and KL to the reference on held-out prompts (fixed sampling seed)
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from rlhf_kernels import NonFiniteLogitsError

from ..algorithms import (Algorithm, Experience, RLHParams, get_algorithm, make_experience,
                          rollouts_to_keep, train_step)
from ..algorithms.experience import DIVERGED_ACTOR
from ..algorithms.nonfinite import NonFiniteError, NonFiniteGuard
from ..data import PromptDataset, SFTDataset, load_phase, phase_data_from_config
from ..data.templates import eos_token_id, pad_token_id
from ..engine import EMA, init_eval_engine, init_train_engine
from ..engine.hybrid import HybridEngine
from ..models import ValueModel, load_causal_lm, save_pretrained_merged
from ..rewards import load_reward_fn
from .checkpoint import load_checkpoint, restore_rng, resume_checkpoint, rng_state, save_checkpoint
from .run_folder import RunFolderError, check_resume_config, claim_run_folder, previous_run
from .scoring import Scorer, evaluate_policy
from .setup import (TORCH_DTYPES, BatchOrder, collate, ds_config, load_base, step_dir, to_device,
                    world)
from .tracking import tracker_for

log = logging.getLogger("rlhf")


@dataclass
class RLRun:
    """What `build_rl` makes from a config: models behind engines, data, generators."""
    cfg: Any
    algorithm: Algorithm
    hp: RLHParams
    samples_per_prompt: int
    tokenizer: Any
    actor: Any                      # DeepSpeed engine (or TorchEngine)
    critic: Any                     # engine, or None when the algorithm has no critic
    reference: Any                  # frozen model, or None when rl.kl_ctl is 0
    scorer: Scorer
    hybrid: HybridEngine
    ema: Optional[EMA]
    prompts: PromptDataset
    held_out: PromptDataset
    order: BatchOrder
    iterations: int
    ptx: Optional[tuple[SFTDataset, BatchOrder]]
    generators: dict[str, torch.Generator]
    output: str
    guard: NonFiniteGuard           # skipped non-finite updates, across iterations

    @property
    def engines(self) -> dict:
        return {"actor": self.actor} | ({"critic": self.critic} if self.critic is not None else {})


@dataclass
class Rollouts:
    """One batch of generated responses and the prompts they answer. `fresh` is False for a
    reused batch, whose behaviour log-probs are of an older policy."""
    prompts: list[str]
    prompt_mask: torch.Tensor
    generation: Any                 # rlhf_kernels GenerationOutput
    fresh: bool = True

    def select(self, rows: torch.Tensor) -> Rollouts:
        g = self.generation
        generation = dataclasses.replace(g, sequences=g.sequences[rows],
                                         logprobs=g.logprobs[rows],
                                         response_mask=g.response_mask[rows])
        return Rollouts([self.prompts[i] for i in rows.tolist()], self.prompt_mask[rows],
                        generation, self.fresh)


# ---------------------------------------------------------------------------- building

def _models(cfg, algorithm):
    """tokenizer, actor (trainable), reference (None when kl_ctl is 0), critic (or None)."""
    sft = step_dir(cfg, "sft")
    actor_path = sft if (sft / "config.json").exists() else cfg.model.name_or_path
    tokenizer, actor = load_base(cfg, actor_path)
    dtype = TORCH_DTYPES[cfg.model.dtype]
    reference = None
    if cfg.rl.kl_ctl > 0:
        reference = (load_causal_lm(actor_path, dtype=dtype) if str(actor_path) != "tiny"
                     else load_base(cfg, "tiny", trainable=False)[1])
    critic = None
    if algorithm.needs_critic:
        critic = ValueModel.load(cfg.rl.critic_model_path or step_dir(cfg, "rm"), dtype=dtype,
                                 gradient_checkpointing=cfg.model.gradient_checkpointing)
    return tokenizer, actor, reference, critic


def _scorer(cfg, tokenizer) -> Scorer:
    if cfg.rl.reward:
        return Scorer(tokenizer, reward_fn=load_reward_fn(cfg.rl.reward),
                      timeout=cfg.rl.reward_timeout)
    model = ValueModel.load(step_dir(cfg, "rm"), dtype=TORCH_DTYPES[cfg.model.dtype])
    return Scorer(tokenizer, reward_model=model)


def _engines(cfg, actor, critic, reference, scorer, iterations, rollouts):
    """DeepSpeed engines of the trained models; the frozen ones prepared for inference (the
    reference with its own offload setting, as DeepSpeed-Chat)."""
    r = cfg.rl
    updates = iterations * r.ppo_epochs * max(rollouts // r.train_batch_size, 1) // r.grad_accum
    common = dict(micro_batch=r.train_batch_size, grad_accum=r.grad_accum, warmup=r.warmup,
                  total_steps=updates, scheduler=r.scheduler, warmup_key="rl.warmup")
    actor = init_train_engine(actor, ds_config(
        cfg, lr=r.actor_lr, weight_decay=r.actor_weight_decay, **common))
    critic = None if critic is None else init_train_engine(critic, ds_config(
        cfg, lr=r.critic_lr, weight_decay=r.critic_weight_decay, **common))
    frozen = dict(lr=1.0, weight_decay=0.0, inference=True, **common)
    if reference is not None:
        reference = init_eval_engine(reference, ds_config(
            cfg, offload=cfg.deepspeed.offload_reference_model, **frozen))
    if scorer.model is not None:
        scorer.model = init_eval_engine(scorer.model, ds_config(cfg, **frozen))
    return actor, critic, reference


def _ptx_data(cfg, tokenizer):
    r = cfg.rl
    if not r.ptx:
        return None
    data = (load_phase("sft", r.ptx_sources, seed=cfg.seed) if r.ptx_sources
            else phase_data_from_config(cfg, "sft"))
    dataset = SFTDataset(data.train, tokenizer, max_seq_len=cfg.model.max_seq_len)
    return dataset, BatchOrder(len(dataset), r.train_batch_size, cfg.seed + 6)


def build_rl(cfg, extra_scores=None) -> RLRun:
    """Models, engines, data and generators of step 3, from the config alone."""
    r = cfg.rl
    algorithm = get_algorithm(r.algorithm)
    hp = RLHParams.from_config(r)
    samples = algorithm.samples_per_prompt(hp)
    tokenizer, actor, reference, critic = _models(cfg, algorithm)
    scorer = _scorer(cfg, tokenizer)
    scorer.extra.update(extra_scores or {})
    phase = phase_data_from_config(cfg, "rl")
    prompts = PromptDataset(phase.train, tokenizer, max_prompt_len=cfg.data.max_prompt_len)
    held_out = PromptDataset(phase.eval, tokenizer, max_prompt_len=cfg.data.max_prompt_len)
    order = BatchOrder(len(prompts), r.generation_batch_size, cfg.seed + 2)
    iterations = order.per_epoch * r.epochs if r.steps < 0 else r.steps
    actor, critic, reference = _engines(cfg, actor, critic, reference, scorer, iterations,
                                        r.generation_batch_size * samples)
    eos = [] if r.ignore_eos else eos_token_id(tokenizer)
    hybrid = HybridEngine(actor, eos_token_id=eos, pad_token_id=pad_token_id(tokenizer))
    generators = {"sample": torch.Generator(actor.device).manual_seed(cfg.seed + 3),
                  "split": torch.Generator().manual_seed(cfg.seed + 4)}
    return RLRun(cfg, algorithm, hp, samples, tokenizer, actor, critic, reference, scorer,
                 hybrid, EMA(actor.module, r.ema_beta) if r.enable_ema else None, prompts,
                 held_out, order, iterations, _ptx_data(cfg, tokenizer), generators,
                 f"{cfg.output}/rl", NonFiniteGuard(cfg.max_skipped_steps, "max_skipped_steps"))


# ---------------------------------------------------------------------------- one iteration

def rollout(run: RLRun, it: int) -> Rollouts:
    """Generate run.samples_per_prompt responses to each prompt of batch `it`."""
    r, n, device = run.cfg.rl, run.samples_per_prompt, run.actor.device
    batch = collate(run.prompts, run.order.batch(it))
    ids = batch["input_ids"].repeat_interleave(n, 0).to(device)
    mask = batch["attention_mask"].repeat_interleave(n, 0).to(device)
    try:
        gen = run.hybrid.generate(ids, mask, max_new_tokens=r.max_new_tokens,
                                  temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                  generator=run.generators["sample"])
    except NonFiniteLogitsError as err:
        raise NonFiniteError(f"rl iteration {it + 1}: rollout: {err}; {DIVERGED_ACTOR}") from err
    return Rollouts([p for p in batch["prompts"] for _ in range(n)], mask, gen)


def drop_short(run: RLRun, batch: Rollouts, last: Optional[Rollouts]):
    """(rollouts to train on or None, number dropped): DeepSpeed-Chat's rule. Rollouts with
    fewer than rl.min_response_tokens tokens are dropped (whole groups for grouped algorithms);
    when none is left the last kept batch is reused, its log-probs recomputed."""
    group = run.samples_per_prompt if run.algorithm.grouped else 1
    keep = rollouts_to_keep(batch.generation.response_mask, run.cfg.rl.min_response_tokens,
                            group)
    dropped = batch.generation.response_mask.shape[0] - keep.numel()
    if dropped == 0:
        return batch, 0
    if keep.numel():
        return batch.select(keep), dropped
    return (None if last is None else dataclasses.replace(last, fresh=False)), dropped


def experience(run: RLRun, batch: Rollouts) -> Experience:
    """Score the rollouts; rewards, advantages and returns as the algorithm defines them."""
    recompute = run.cfg.rl.recompute_logprobs or not batch.fresh
    return make_experience(
        batch.generation, batch.prompt_mask, actor=run.actor, reference=run.reference,
        reward_fn=lambda s, a, m: run.scorer(batch.prompts, s, a, m), algorithm=run.algorithm,
        hp=run.hp, critic=run.critic, use_behaviour_logprobs=not recompute)


def update(run: RLRun, exp: Experience, it: int) -> dict[str, float]:
    """hp.ppo_epochs passes of actor (and critic) updates, with a ptx batch when asked."""
    ptx_batches = None
    if run.ptx is not None:
        dataset, order = run.ptx
        ptx_batches = [to_device(collate(dataset, order.batch(it)), run.actor.device)]
    with run.hybrid.train():
        stats = train_step(run.actor, run.critic, exp, run.algorithm, run.hp,
                           ptx_batches=ptx_batches, generator=run.generators["split"],
                           guard=run.guard)
    if run.ema is not None:
        run.ema.update(run.actor.module)
    return stats


def _metrics(run: RLRun, exp: Experience, stats: dict, batch: Rollouts, dropped: int,
             experience_s: float) -> dict[str, float]:
    action = exp.action_mask.float()
    metrics = {"reward": float(exp.scores.mean()), "response_len": float(action.sum(1).mean()),
               **stats, "dropped_rollouts": dropped, "reused_rollouts": float(not batch.fresh)}
    if exp.ref_logprobs is not None:
        metrics["kl"] = float(((exp.old_logprobs - exp.ref_logprobs) * action).sum(1).mean())
    metrics.update(run.scorer.extras(batch.prompts, exp.sequences, exp.action_mask,
                                     exp.prompt_len))
    times = run.hybrid.take_times()
    return metrics | {f"time_{k}": v for k, v in times.items()} | {
        "time_experience": experience_s}


# ---------------------------------------------------------------------------- the loop

def _resume(run: RLRun, resume: bool) -> dict:
    """The loop state of the latest checkpoint (engines, RNGs, EMA restored; config compared),
    else a fresh one."""
    state = {"iteration": 0, "history": [], "eval_before": None}
    folder = resume_checkpoint(run.output) if resume else None
    if folder is None:
        if resume:
            (log.warning if previous_run(run.output) else log.info)(
                "resume: no checkpoint in %s, RL starts from iteration 0", run.output)
        return state
    check_resume_config(folder, run.cfg, "rl")
    state = load_checkpoint(folder, run.engines, verify=False)  # resume_checkpoint did
    if state["iteration"] > run.iterations:
        raise RunFolderError(f"checkpoint {folder} is past the end of the run: rl.steps / "
                             f"rl.epochs now give {run.iterations} iterations, it has done "
                             f"{state['iteration']}")
    restore_rng(state["rng"], run.generators)
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    elif run.ema is not None:
        log.warning("checkpoint %s has no EMA state: the EMA restarts from the SFT weights",
                    folder)
    log.info("resumed RL from %s at iteration %d", folder, state["iteration"])
    return state


def _evaluate(run: RLRun) -> dict[str, float]:
    r = run.cfg.rl
    return evaluate_policy(run.hybrid, run.reference, run.scorer, run.held_out,
                           max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                           batch_size=r.generation_batch_size, seed=run.cfg.seed + 5,
                           device=run.actor.device)


def _save(run: RLRun, step: int, tracker, state: dict) -> None:
    tracker.flush()
    save_checkpoint(run.output, step, run.engines, {
        "iteration": step, "history": tracker.history, "rng": rng_state(run.generators),
        "eval_before": state["eval_before"],
        "ema": None if run.ema is None else run.ema.state_dict()}, config=run.cfg)


def _finish(run: RLRun, state: dict, history: list, seconds: float) -> dict:
    after = _evaluate(run)
    save_pretrained_merged(run.actor, f"{run.output}/actor", run.tokenizer)
    if run.ema is not None:
        run.ema.copy_to(run.actor.module)
        save_pretrained_merged(run.actor, f"{run.output}/actor_ema", run.tokenizer)
    log.info("RL done: before %s after %s", state["eval_before"], after)
    return {"eval_before": state["eval_before"], "eval_after": after,
            "iterations": run.iterations, "seconds": seconds,
            "generation_path": run.hybrid.last_path, "world_size": world()[1],
            "history": history}


def run_rl(cfg, *, resume=False, overwrite=False, extra_scores=None):
    """Trains step 3; writes the actor to <output>/rl/actor (<output>/rl/actor_ema with EMA),
    holding <output>/rl locked meanwhile. A folder that holds a run is continued with `resume`
    (from its latest checkpoint) or replaced with `overwrite`; otherwise it is refused.
    Returns metrics: eval before / after, steps, seconds, time breakdown."""
    # the folder build_rl names run.output, claimed before the models are built
    with claim_run_folder(f"{cfg.output}/rl", resume=resume, overwrite=overwrite):
        return _train_rl(cfg, resume, extra_scores)


def _train_rl(cfg, resume, extra_scores):
    r, start_time = cfg.rl, time.time()
    torch.manual_seed(cfg.seed)
    run = build_rl(cfg, extra_scores)
    state = _resume(run, resume)
    if state["eval_before"] is None:
        state["eval_before"] = _evaluate(run)
    tracker = tracker_for(cfg, run.output, f"rl-{r.algorithm}", total=run.iterations,
                          history=state["history"])
    run.hybrid.take_times()
    last = None
    for it in range(state["iteration"], run.iterations):
        batch, dropped = drop_short(run, rollout(run, it), last)
        if batch is None:
            log.warning("iteration %d: all %d rollouts are shorter than rl.min_response_tokens "
                        "= %d and none was kept before: no update", it + 1, dropped,
                        r.min_response_tokens)
            tracker.log(it + 1, {"dropped_rollouts": dropped, "skipped_iterations": 1.0})
            continue
        last = batch
        t0 = time.perf_counter()
        try:
            exp = experience(run, batch)
            experience_s = time.perf_counter() - t0
            stats = update(run, exp, it)
        except NonFiniteError as err:
            raise NonFiniteError(f"rl iteration {it + 1}: {err}") from err
        metrics = _metrics(run, exp, stats, batch, dropped, experience_s)
        if r.eval_every and (it + 1) % r.eval_every == 0:
            metrics.update({f"eval_{k}": v for k, v in _evaluate(run).items()})
        tracker.log(it + 1, metrics)
        if r.save_every and (it + 1) % r.save_every == 0 and it + 1 < run.iterations:
            _save(run, it + 1, tracker, state)
    tracker.close()
    return _finish(run, state, tracker.history, time.time() - start_time)
