"""rlhf.engine: DeepSpeed configs, engines on the CPU (single process, gloo), the weight EMA."""
import copy
import itertools
import math

import pytest
import torch
from deepspeed.accelerator import get_accelerator
from torch import nn

import rlhf.models.fused_forward as fused_forward
from rlhf.algorithms.model_forward import causal_lm_logits
from rlhf.engine import (
    EMA,
    config_dtype,
    init_distributed,
    init_eval_engine,
    init_train_engine,
    lr_factor,
    make_ds_config,
    on_cpu,
    weight_decay_groups,
)
from rlhf.engine.deepspeed_init import clip_gradients_foreach
from rlhf.models import apply_lora, full_state_dict, load_tiny
from rlhf.models.export import gathered

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "one two three four five six"]
DEVICE = get_accelerator().current_device_name()  # where the engines put the models


@pytest.fixture(scope="module")
def tiny():
    return load_tiny(TEXTS * 3, seed=1, vocab_size=90)


@pytest.fixture
def fresh_model(tiny):
    """A copy per test: engines attach hooks (ZeRO-3 partitions the parameters in place)."""
    return copy.deepcopy(tiny[0])


@pytest.fixture(scope="module")
def batch(tiny):
    enc = tiny[1](TEXTS[:2], return_tensors="pt", padding=True)
    tensors = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": enc.input_ids}
    return {k: v.to(DEVICE) for k, v in tensors.items()}


def train_config(stage, **kwargs):
    settings = {"stage": stage, "micro_batch": 2, "lr": 1e-3, "scheduler": "constant", "torch_adam": True}
    settings.update(kwargs)
    return make_ds_config(**settings)


# ---------------------------------------------------------------- config dicts


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_config_zero_sections(stage):
    cfg = make_ds_config(stage=stage, offload=stage > 0, total_steps=10)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == ("cpu" if stage > 0 else "none")
    assert ("offload_param" in zero) == (stage == 3)
    if stage == 3:
        assert zero["offload_param"]["device"] == "cpu"
        assert zero["stage3_param_persistence_threshold"] == 1e4
    assert "hybrid_engine" not in cfg and "inference" not in str(cfg).lower()


@pytest.mark.parametrize("dtype, bf16, fp16", [("fp32", False, False), ("bf16", True, False),
                                               ("fp16", False, True)])
def test_config_precision(dtype, bf16, fp16):
    cfg = make_ds_config(dtype=dtype, total_steps=5)
    assert (cfg["bf16"]["enabled"], cfg["fp16"]["enabled"]) == (bf16, fp16)
    assert config_dtype(cfg) == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def test_config_batch_optimizer_and_clipping():
    cfg = make_ds_config(micro_batch=3, grad_accum=4, train_batch_size=12, lr=2e-5, weight_decay=0.1,
                         gradient_clipping=0.5, torch_adam=True, total_steps=100)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"],
            cfg["train_batch_size"]) == (3, 4, 12)
    assert cfg["optimizer"]["type"] == "AdamW"
    params = cfg["optimizer"]["params"]
    assert (params["lr"], params["weight_decay"], params["torch_adam"]) == (2e-5, 0.1, True)
    assert cfg["gradient_clipping"] == 0.5
    assert "train_batch_size" not in make_ds_config(total_steps=1)


@pytest.mark.parametrize("scheduler, total", [("cosine", 50), ("linear", 50), ("constant", None)])
def test_config_schedule(scheduler, total):
    cfg = make_ds_config(scheduler=scheduler, warmup_steps=5, total_steps=total, lr=1e-4)
    assert cfg["lr_schedule"] == {"kind": scheduler, "warmup_steps": 5, "total_steps": total}
    assert "scheduler" not in cfg  # DeepSpeed's own schedulers would start at lr 0


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_factor_shapes(kind):
    f = [lr_factor(s, kind=kind, warmup_steps=4, total_steps=14) for s in range(16)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and f[4] == 1.0
    if kind == "constant":
        assert f[4:] == [1.0] * 12
        return
    assert all(a > b for a, b in itertools.pairwise(f[4:14])) and f[13] > 0 and f[14:] == [0.0, 0.0]
    want_mid = 0.5 if kind == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5))
    assert f[9] == pytest.approx(want_mid)
    assert lr_factor(0, kind=kind, warmup_steps=0, total_steps=10) == 1.0


@pytest.mark.parametrize("stage, partitioned", [(0, 0), (2, 0), (3, 3)])
def test_eval_config(stage, partitioned):
    cfg = make_ds_config(stage=stage, dtype="bf16", offload=stage > 0, inference=True)
    assert cfg["zero_optimization"]["stage"] == partitioned
    assert not {"optimizer", "scheduler", "lr_schedule"} & set(cfg) and cfg["bf16"]["enabled"]
    assert ("offload_param" in cfg["zero_optimization"]) == (stage == 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"stage": 4}, "ZeRO stage"),
    ({"dtype": "fp8"}, "dtype"),
    ({"stage": 0, "offload": True}, "offload needs ZeRO stage"),
    ({"scheduler": "cosine"}, "total_steps"),
    ({"scheduler": "linear", "total_steps": 0}, "total_steps"),
    ({"scheduler": "step", "total_steps": 5}, "scheduler"),
    ({"warmup_steps": -1, "total_steps": 5}, "warmup_steps"),
    ({"micro_batch": 0}, "micro_batch"),
    ({"grad_accum": 1.5}, "grad_accum"),
    ({"lr": 0.0, "total_steps": 5}, "lr > 0"),
    ({"warmup_steps": 5, "total_steps": 5}, "below total_steps"),
])
def test_config_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_ds_config(**kwargs)


# ---------------------------------------------------------------- engines


def test_init_distributed_single_process():
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert init_distributed() == info
    if on_cpu():
        assert torch.distributed.get_backend() == "gloo"


def trained_params(engine):
    return {k: v.clone() for k, v in full_state_dict(engine).items()}


@pytest.mark.parametrize("stage", [0, 3])
def test_one_step_train_lowers_loss(fresh_model, batch, stage):
    engine = init_train_engine(fresh_model, train_config(stage))
    assert isinstance(engine.basic_optimizer, torch.optim.AdamW)
    engine.train()
    before = trained_params(engine)
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    after = trained_params(engine)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert engine(**batch).loss.item() < loss.item()
    if stage == 3:
        assert all(hasattr(p, "ds_id") for p in engine.module.parameters())  # partitioned


def test_bf16_lora_step_and_ema_on_zero3(fresh_model, batch):
    apply_lora(fresh_model, 4)
    engine = init_train_engine(fresh_model, train_config(3, dtype="bf16", lr=1e-2))
    ema = EMA(engine, beta=0.9)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    assert start and all("lora_" in name for name in start)
    engine.backward(engine(**batch).loss)
    engine.step()
    ema.update(engine)
    with gathered(engine.module):
        now = {n: p.detach().float().clone() for n, p in engine.module.named_parameters() if n in start}
    for name, first in start.items():
        torch.testing.assert_close(ema.shadow[name], 0.9 * first + 0.1 * now[name])
    # lora_B starts at zero: the step moved it, and the average followed
    assert any(ema.shadow[n].abs().sum() > 0 for n in start if "lora_B" in n)


def test_engine_leaves_config_alone_and_uses_torch_adam_on_cpu(fresh_model):
    if not on_cpu():
        pytest.skip("the CPU picks torch's AdamW by itself; GPUs use DeepSpeed's")
    cfg = make_ds_config(stage=0, micro_batch=2, scheduler="constant")
    snapshot = copy.deepcopy(cfg)
    engine = init_train_engine(fresh_model, cfg)
    assert isinstance(engine.basic_optimizer, torch.optim.AdamW)
    assert cfg == snapshot


@pytest.mark.parametrize("scheduler, warmup", [("cosine", 0), ("linear", 3), ("constant", 2)])
def test_engine_steps_the_schedule(scheduler, warmup):
    cfg = make_ds_config(stage=0, micro_batch=1, lr=0.1, scheduler=scheduler, warmup_steps=warmup,
                         total_steps=6, torch_adam=True)
    engine = init_train_engine(nn.Linear(4, 2), cfg)
    seen = []
    for _ in range(6):
        seen.append(engine.get_lr()[0])
        engine.backward(engine(torch.ones(1, 4, device=DEVICE)).sum())
        engine.step()
    want = [0.1 * lr_factor(s, **cfg["lr_schedule"]) for s in range(6)]
    assert seen == pytest.approx(want) and seen[0] > 0


def test_weight_decay_groups_skip_biases_and_norms(tiny):
    model = tiny[0]
    decay, no_decay = weight_decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    norm = model.model.norm.weight
    assert any(p is norm for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_train_engine_bad_input(fresh_model):
    with pytest.raises(ValueError, match="no optimizer section"):
        init_train_engine(fresh_model, make_ds_config(inference=True))
    with pytest.raises(ValueError, match="nothing to train"):
        init_train_engine(fresh_model.requires_grad_(False), train_config(0))


def test_fp16_on_cpu_is_refused(fresh_model):
    if not on_cpu():
        pytest.skip("fp16 runs on GPUs")
    with pytest.raises(ValueError, match="fp16 does not run on the CPU"):
        init_train_engine(fresh_model, train_config(0, dtype="fp16"))
    with pytest.raises(ValueError, match="fp16 does not run on the CPU"):
        init_eval_engine(fresh_model, make_ds_config(dtype="fp16", inference=True))


@pytest.mark.parametrize("stage", [0, 3])
def test_eval_engine_is_frozen_and_matches(fresh_model, batch, stage):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = fresh_model.to(DEVICE)(**inputs).logits
    frozen = init_eval_engine(fresh_model, make_ds_config(stage=stage, micro_batch=2, inference=True))
    assert not fresh_model.training
    assert not any(p.requires_grad for p in fresh_model.parameters())
    out = frozen(**inputs).logits
    assert not out.requires_grad
    torch.testing.assert_close(out, want)
    if stage == 3:
        assert frozen.module is fresh_model
        assert fresh_model.model.layers[0].mlp.up_proj.weight.numel() == 0  # partitioned
    else:
        assert frozen is fresh_model


def test_eval_engine_casts_to_config_dtype(fresh_model):
    frozen = init_eval_engine(fresh_model, make_ds_config(dtype="bf16", inference=True))
    assert next(frozen.parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------- EMA


def toy_module():
    gen = torch.Generator().manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    module[1].weight.requires_grad_(False)
    return module


def test_ema_math():
    module = toy_module()
    w0 = module[0].weight.detach().clone()
    ema = EMA(module, beta=0.75)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.bias"}  # frozen parameters are not tracked
    with torch.no_grad():
        module[0].weight.add_(1.0)
    w1 = module[0].weight.detach().clone()
    ema.update(module)
    torch.testing.assert_close(ema.shadow["0.weight"], 0.75 * w0 + 0.25 * w1)
    with torch.no_grad():
        module[0].weight.mul_(-2.0)
    ema.update(module)
    w2 = module[0].weight.detach()
    torch.testing.assert_close(ema.shadow["0.weight"], 0.75 * (0.75 * w0 + 0.25 * w1) + 0.25 * w2)
    assert ema.num_updates == 2


def test_ema_float32_shadow_copy_to_and_state():
    module = toy_module().to(torch.bfloat16)
    ema = EMA(module, beta=0.5)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    with torch.no_grad():
        module[0].bias.add_(2.0)
    ema.update(module)
    target = toy_module().to(torch.bfloat16)
    target.requires_grad_(False)  # a frozen copy still receives the averaged weights
    ema.copy_to(target)
    assert torch.equal(target[0].bias, ema.shadow["0.bias"].to(torch.bfloat16))
    restored = EMA(toy_module(), beta=0.1)
    restored.load_state_dict(ema.state_dict())
    assert restored.beta == 0.5 and restored.num_updates == 1
    assert torch.equal(restored.shadow["0.bias"], ema.shadow["0.bias"])


def test_ema_bad_input():
    with pytest.raises(ValueError, match="beta"):
        EMA(toy_module(), beta=1.0)
    with pytest.raises(ValueError, match="no trainable parameter"):
        EMA(toy_module().requires_grad_(False))
    ema = EMA(toy_module())
    with pytest.raises(ValueError, match="does not have the EMA's parameters"):
        ema.update(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="does not match"):
        ema.load_state_dict({"beta": 0.5, "num_updates": 0, "shadow": {}})


# ---------------------------------------------------------------- unwrap


def test_unwrap_reaches_the_model_through_engines_ddp_and_peft(fresh_model):
    """One `unwrap` for the trainer, export, EMA, the hybrid engine and generation: through
    DeepSpeed engines, DDP, TorchEngine and peft's PeftModel, nested in any order."""
    from peft import LoraConfig, get_peft_model

    from rlhf.algorithms import TorchEngine
    from rlhf.models import ValueModel, unwrap

    assert unwrap(fresh_model) is fresh_model
    engine = init_train_engine(fresh_model, train_config(0))
    assert unwrap(engine) is fresh_model
    sgd = torch.optim.SGD(fresh_model.parameters(), lr=0.1)
    assert unwrap(TorchEngine(fresh_model, sgd)) is fresh_model
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(2, 2)))
    assert unwrap(ddp) is ddp.module
    value_model = ValueModel.from_causal_lm(copy.deepcopy(fresh_model))
    assert unwrap(TorchEngine(value_model, sgd)) is value_model  # the model, not its backbone
    base = copy.deepcopy(fresh_model)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    assert unwrap(peft_model) is base
    assert unwrap(init_train_engine(peft_model, train_config(0))) is base


# ---------------------------------------------------------------- training forwards on the fused path


@pytest.mark.parametrize("stage, fused", [(0, True), (2, True), (3, False)])
def test_update_through_the_engine_on_the_fused_forward_equals_hf(tiny, batch, stage, fused,
                                                                    monkeypatch):
    """The actor's training forward goes through the engine (its hooks run) to the fused path,
    and the gradients it gives equal the Hugging Face forward's; ZeRO-3 keeps HF (partitioned
    weights). fp32 in another summation order: the tolerance of test_sequence_forward's
    gradient test, 2e-5 of a tensor's largest gradient."""
    from deepspeed.utils import safe_get_full_grad
    taken = []
    original = fused_forward.sequence_forward
    monkeypatch.setattr(fused_forward, "sequence_forward",
                        lambda *a, **k: taken.append(out := original(*a, **k)) or out)
    grads, losses = {}, {}
    for enabled in (True, False):
        monkeypatch.setattr(fused_forward, "ENABLED", enabled)
        engine = init_train_engine(copy.deepcopy(tiny[0]), train_config(stage))
        engine.train()
        logits = causal_lm_logits(engine, batch["input_ids"], batch["attention_mask"])
        logp = logits[:, :-1].float().log_softmax(-1).gather(
            -1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        loss = -(logp * batch["attention_mask"][:, 1:]).sum()
        engine.backward(loss)
        grads[enabled] = {name: safe_get_full_grad(p).clone()
                          for name, p in engine.module.named_parameters()}
        engine.step()
        losses[enabled] = loss.item()
    assert [out is not None for out in taken] == ([True] if fused else [False])
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    for name, grad in grads[False].items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[True][name], grad, atol=2e-5 * scale, rtol=0, msg=name)


def test_one_rank_fp32_clip_equals_deepspeeds(fresh_model, rng):
    """At one rank, ZeRO-0, fp32 the engine clips with torch's multi-tensor kernels: the same
    scaling as DeepSpeed's per-parameter clip (float32 rounding of the norm apart)."""
    from deepspeed.runtime.utils import clip_grad_norm_ as deepspeed_clip
    engine = init_train_engine(fresh_model, train_config(0, gradient_clipping=0.5))
    assert engine.clip_fp32_gradients.func is clip_gradients_foreach
    params = list(engine.module.parameters())
    grads = [torch.randn(p.shape, generator=rng) for p in params]
    clipped = {}
    for name, clip in (("ours", engine.clip_fp32_gradients),
                       ("deepspeed", lambda: deepspeed_clip(params, max_norm=0.5))):
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.device)
        norm = clip()
        clipped[name] = [p.grad.clone() for p in params]
        assert float(norm) == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item(),
                                            rel=1e-5)
    for ours, theirs in zip(clipped["ours"], clipped["deepspeed"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert torch.cat([g.flatten() for g in clipped["ours"]]).norm().item() == pytest.approx(0.5, rel=1e-4)
