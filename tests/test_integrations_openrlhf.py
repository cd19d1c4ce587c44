"""rlhf_kernels.integrations.openrlhf: patched functions against OpenRLHF's behaviour.

OpenRLHF does not import here (flash-attn, ...): the tests run against a stand-in package
whose functions are float64 oracles written from OpenRLHF 0.11's documented behaviour (see
integration_helpers); against the installed package too when it imports.
"""
import math
import types

import pytest
import torch

from gae_oracle import error_bound
from integration_helpers import absent, importable, standin_package
from logprobs_oracle import fwd_tolerance, grad_tolerance
from rlhf_kernels.integrations import openrlhf as rk_openrlhf

UTILS, LOSS = "openrlhf.models.utils", "openrlhf.models.loss"
MAKER = "openrlhf.trainer.ppo_utils.experience_maker"


# ---- float64 oracles of the patched functions ---------------------------------------------

def log_probs_from_logits(logits, labels, temperature=1.0):
    if temperature != 1.0:
        logits.div_(temperature)  # OpenRLHF scales the caller's logits in place
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.long()[..., None])[..., 0]
    return logp.to(logits.dtype)


def compute_entropy(logits):
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1).to(logits.dtype)


class RemoteExperienceMaker:
    def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
        """GAE over every position of the mask-multiplied rewards and values, in closed form:
        A_t = sum_{s >= t} (gamma*lambd)^(s-t) * delta_s."""
        if action_mask is not None:
            values, rewards = action_mask * values, action_mask * rewards
        dtype = torch.promote_types(values.dtype, rewards.dtype)
        v, r = values.double(), rewards.double()
        next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
        delta = r + gamma * next_v - v
        t = torch.arange(v.shape[1], dtype=torch.float64)
        lag = t[None, :] - t[:, None]  # [t, s] = s - t
        weights = torch.where(lag >= 0, (gamma * lambd) ** lag.clamp(min=0), 0.0)
        adv = delta @ weights.T
        return adv.to(dtype), (adv + v).to(dtype)


class ValueLoss(torch.nn.Module):
    def __init__(self, clip_eps=None, token_level_loss=True):
        super().__init__()
        self.clip_eps, self.token_level_loss = clip_eps, token_level_loss

    def forward(self, values, old_values, returns, action_mask=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None):
        v, old, ret = values.double(), old_values.double(), returns.double()
        per_token = (v - ret) ** 2
        if self.clip_eps is not None:
            v_clipped = old + (v - old).clamp(-self.clip_eps, self.clip_eps)
            per_token = torch.maximum(per_token, (v_clipped - ret) ** 2)
        dtype = torch.promote_types(values.dtype, torch.promote_types(old_values.dtype,
                                                                      returns.dtype))
        if action_mask is None:
            return (0.5 * per_token.mean()).to(dtype)
        if action_mask.is_floating_point():
            dtype = torch.promote_types(dtype, action_mask.dtype)
        m = action_mask.double()
        if self.token_level_loss:
            count = m.sum() if batch_num_tokens is None else batch_num_tokens / dp_size
            return (0.5 * (per_token * m).sum() / count).to(dtype)
        tokens = m.sum(-1)
        kept = tokens > 0  # rows without a valid token are left out of the mean
        row_means = (per_token * m).sum(-1)[kept] / tokens[kept]
        count = kept.sum() if global_batch_size is None else global_batch_size / dp_size
        return (0.5 * row_means.sum() / count).to(dtype)


STANDIN = {UTILS: dict(log_probs_from_logits=log_probs_from_logits,
                       compute_entropy=compute_entropy),
           "openrlhf.models.actor": dict(log_probs_from_logits=log_probs_from_logits,
                                         compute_entropy=compute_entropy),
           LOSS: dict(ValueLoss=ValueLoss),
           MAKER: dict(RemoteExperienceMaker=RemoteExperienceMaker)}
INSTALLED, WHY_NOT = importable(MAKER)


@pytest.fixture(params=["stand-in"] + (["installed"] if INSTALLED else []))
def lib(request):
    """The modules, unpatched; every test leaves them unpatched."""
    def modules():
        import importlib
        return types.SimpleNamespace(utils=importlib.import_module(UTILS),
                                     loss=importlib.import_module(LOSS),
                                     maker=importlib.import_module(MAKER))
    if request.param == "installed":
        yield modules()
    else:
        with standin_package("openrlhf", STANDIN):
            yield modules()
    rk_openrlhf.unpatch()


@pytest.fixture
def patched(lib):
    """(originals, patched) namespaces of the functions under test."""
    def grab():
        return types.SimpleNamespace(
            log_probs=lib.utils.log_probs_from_logits, entropy=lib.utils.compute_entropy,
            gae=lib.maker.RemoteExperienceMaker.__dict__["get_advantages_and_returns"],
            value_forward=lib.loss.ValueLoss.__dict__["forward"])
    before = grab()
    rk_openrlhf.patch()
    return before, grab()


def _masks(batch, length, gen, dtype=torch.bool):
    """Right padding, left padding, holes in the middle, a full row, an empty row."""
    m = torch.rand(batch, length, generator=gen) < 0.7
    m[0] = torch.arange(length) < length // 2
    m[1] = torch.arange(length) >= length // 3
    m[2] = True
    m[-1] = False
    return m.to(dtype)


# ---- the mechanism ------------------------------------------------------------------------

@pytest.mark.skipif(not INSTALLED, reason=f"the tests ran on the stand-in only: {WHY_NOT}")
def test_the_installed_openrlhf_was_tested_too():
    """Every test above and below also ran against the installed OpenRLHF."""

def test_patch_reports_every_reference_and_unpatch_restores_the_originals(lib):
    before = (lib.utils.log_probs_from_logits, lib.utils.compute_entropy,
              lib.maker.RemoteExperienceMaker.__dict__["get_advantages_and_returns"],
              lib.loss.ValueLoss.__dict__["forward"])
    actor = __import__("openrlhf.models.actor", fromlist=["x"])
    report = rk_openrlhf.patch()
    assert "openrlhf.models.utils.log_probs_from_logits -> rlhf_kernels.logprobs" in report
    assert "openrlhf.models.actor.log_probs_from_logits -> rlhf_kernels.logprobs" in report
    assert any(line.startswith(MAKER + ".RemoteExperienceMaker.get_advantages_and_returns")
               for line in report)
    assert "openrlhf.models.loss.ValueLoss.forward -> rlhf_kernels.ppo_critic_loss" in report
    assert actor.log_probs_from_logits is lib.utils.log_probs_from_logits is not before[0]
    assert rk_openrlhf.is_patched() and rk_openrlhf.patch() == report  # idempotent
    assert lib.utils.log_probs_from_logits.__wrapped__ is before[0]  # wrapped once only
    assert len(rk_openrlhf.unpatch()) == 4 and not rk_openrlhf.is_patched()
    after = (lib.utils.log_probs_from_logits, lib.utils.compute_entropy,
             lib.maker.RemoteExperienceMaker.__dict__["get_advantages_and_returns"],
             lib.loss.ValueLoss.__dict__["forward"])
    assert all(a is b for a, b in zip(after, before)) and actor.log_probs_from_logits is before[0]


def test_patch_without_openrlhf_raises_import_error_naming_it():
    with absent("openrlhf"), pytest.raises(ImportError, match="'openrlhf'.*pip install openrlhf"):
        rk_openrlhf.patch()
    assert not rk_openrlhf.is_patched()


def test_a_target_whose_module_does_not_import_is_skipped_and_the_others_patched():
    with standin_package("openrlhf", STANDIN) as mods:
        import sys
        sys.modules[MAKER] = None  # as without vllm: experience_maker's imports fail
        try:
            report = rk_openrlhf.patch()
            assert f"{UTILS}.log_probs_from_logits -> rlhf_kernels.logprobs" in report
            assert f"{LOSS}.ValueLoss.forward -> rlhf_kernels.ppo_critic_loss" in report
            assert not any(MAKER in line for line in report)
            assert mods[UTILS].log_probs_from_logits is not log_probs_from_logits
            (skip,) = rk_openrlhf.skipped()
            assert skip.startswith(MAKER + ".RemoteExperienceMaker.get_advantages_and_returns: "
                                   + MAKER + " does not import (ModuleNotFoundError")
        finally:
            rk_openrlhf.unpatch()
        assert mods[UTILS].log_probs_from_logits is log_probs_from_logits
        assert not rk_openrlhf.is_patched()


class ValueLossOfAnotherVersion(ValueLoss):
    def forward(self, values, old_values, returns, action_mask=None, loss_mask=None):
        return super().forward(values, old_values, returns, action_mask)


@pytest.mark.parametrize("version", [None, "0.12.1", "0.10.4"])
def test_outside_the_tested_versions_a_changed_signature_is_skipped(monkeypatch, version):
    from rlhf_kernels.integrations import _patching
    monkeypatch.setattr(_patching, "installed_version", lambda *_: version)
    changed = {**STANDIN, LOSS: dict(ValueLoss=ValueLossOfAnotherVersion)}
    with standin_package("openrlhf", changed):
        try:
            report = rk_openrlhf.patch()
            assert not any("ValueLoss" in line for line in report)
            assert any(line.startswith(MAKER) for line in report)  # signatures as recorded
            (skip,) = rk_openrlhf.skipped()
            name = version or "(version unknown)"
            assert skip.startswith(f"{LOSS}.ValueLoss.forward: openrlhf {name} is outside the "
                                   f"tested versions {rk_openrlhf.TESTED_VERSIONS}, and its "
                                   "signature (self, ")
            assert "loss_mask" in skip
        finally:
            rk_openrlhf.unpatch()


def test_inside_the_tested_versions_signatures_are_not_checked(monkeypatch):
    from rlhf_kernels.integrations import _patching
    monkeypatch.setattr(_patching, "installed_version", lambda *_: "0.11.2")
    changed = {**STANDIN, LOSS: dict(ValueLoss=ValueLossOfAnotherVersion)}
    with standin_package("openrlhf", changed):
        try:
            report = rk_openrlhf.patch()
            assert any("ValueLoss.forward" in line for line in report)
            assert rk_openrlhf.skipped() == []
        finally:
            rk_openrlhf.unpatch()


# ---- log-probs and entropy ----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 1, 1), (7, 129), (2, 3, 2, 19)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_match_and_scale_the_logits_in_place(patched, shape, temperature, rng):
    original, new = patched
    logits = torch.randn(shape, generator=rng) * 4
    labels = torch.randint(0, shape[-1], shape[:-1], generator=rng)
    x_ref, x_new = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    with torch.no_grad():  # the in-place division needs a tensor outside autograd
        want = original.log_probs(x_ref.detach(), labels, temperature)
        got = new.log_probs(x_new.detach(), labels, temperature)
    assert got.dtype == want.dtype == torch.float32 and got.shape == shape[:-1]
    assert torch.equal(x_new, x_ref) and torch.allclose(x_new, logits / temperature)
    tol = 2 * fwd_tolerance(logits, temperature, shape[-1])
    assert (got - want).abs().max() <= tol
    # gradients, at temperature 1 (no in-place scaling)
    weights = torch.randn(shape[:-1], generator=rng)
    (g_want,) = torch.autograd.grad((original.log_probs(x_ref, labels) * weights).sum(), x_ref)
    (g_got,) = torch.autograd.grad((new.log_probs(x_new, labels) * weights).sum(), x_new)
    assert (g_got - g_want).abs().max() <= grad_tolerance(g_want, tol, torch.float32)


def test_log_probs_and_entropy_of_bf16_logits_keep_bf16(patched, rng):
    original, new = patched
    logits = (torch.randn(4, 6, 53, generator=rng) * 3).bfloat16()
    labels = torch.randint(0, 53, (4, 6), generator=rng)
    exact = (log_probs_from_logits(logits.double(), labels), compute_entropy(logits.double()))
    for fn, want in zip(("log_probs", "entropy"), exact):
        args = (logits, labels) if fn == "log_probs" else (logits,)
        got = getattr(new, fn)(*args)
        assert got.dtype == getattr(original, fn)(*args).dtype == torch.bfloat16
        # a float32 result rounded to bf16: one bf16 ulp (<= 2^-7 relative) of the exact value
        assert ((got.double() - want).abs() <= 2 ** -7 * want.abs() + 1e-6).all()


@pytest.mark.parametrize("shape", [(3, 5, 37), (11, 2), (1, 1, 1)])
def test_entropy_matches_with_gradients(patched, shape, rng):
    original, new = patched
    logits = torch.randn(shape, generator=rng) * 3
    x_ref, x_new = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want, got = original.entropy(x_ref), new.entropy(x_new)
    tol = 2 * fwd_tolerance(logits, 1.0, shape[-1])
    assert got.dtype == torch.float32 and (got - want).abs().max() <= tol
    weights = torch.randn(shape[:-1], generator=rng)
    (g_want,) = torch.autograd.grad((want * weights).sum(), x_ref)
    (g_got,) = torch.autograd.grad((got * weights).sum(), x_new)
    assert (g_got - g_want).abs().max() <= grad_tolerance(g_want, tol, torch.float32)


def test_out_of_range_labels_raise_a_clear_error(patched):
    _, new = patched
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        new.log_probs(torch.randn(2, 3, 5), torch.full((2, 3), 5))


# ---- GAE ----------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, None])
def test_gae_matches_over_every_position(patched, gamma, lam, mask_dtype, rng):
    original, new = patched
    batch, length = 5, 23
    rewards, values = torch.randn(batch, length, generator=rng), torch.randn(batch, length,
                                                                             generator=rng)
    mask = None if mask_dtype is None else _masks(batch, length, rng, mask_dtype)
    want = original.gae(None, values, rewards, mask, gamma, lam)
    got = new.gae(None, values, rewards, mask, gamma, lam)
    m = torch.ones(batch, length) if mask is None else mask.float()
    tol = error_bound(rewards * m, values * m, torch.ones(batch, length),
                      want[0].double().numpy(), gamma, lam,
                      scan_depth=math.ceil(math.log2(length)))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32 and g.shape == w.shape
        assert (g - w).abs().max() <= 2 * tol
    if mask is not None:  # masked positions are not zeroed: a hole before a value sees it
        assert (got[0][1, : length // 3].abs() > 0).any()


def test_gae_of_bf16_inputs_returns_bf16(patched, rng):
    original, new = patched
    rewards = torch.randn(3, 9, generator=rng).bfloat16()
    values = torch.randn(3, 9, generator=rng).bfloat16()
    mask = _masks(3, 9, rng)
    exact = RemoteExperienceMaker().get_advantages_and_returns(
        values.double(), rewards.double(), mask, 1.0, 0.95)
    got = new.gae(None, values, rewards, mask, 1.0, 0.95)
    for g, w, o in zip(got, exact, original.gae(None, values, rewards, mask, 1.0, 0.95)):
        assert g.dtype == o.dtype == torch.bfloat16
        assert ((g.double() - w).abs() <= 2 ** -7 * w.abs() + 1e-5).all()


@pytest.mark.parametrize("case", ["float64", "gamma>1", "nan"])
def test_gae_inputs_the_kernel_cannot_take_go_to_openrlhf(patched, case, rng):
    original, new = patched
    rewards, values = torch.randn(2, 7, generator=rng), torch.randn(2, 7, generator=rng)
    gamma = 1.5 if case == "gamma>1" else 1.0
    if case == "float64":
        rewards, values = rewards.double(), values.double()
    if case == "nan":
        values[0, 3] = float("nan")
    want = original.gae(None, values, rewards, None, gamma, 0.95)
    got = new.gae(None, values, rewards, None, gamma, 0.95)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g.nan_to_num(7.0), w.nan_to_num(7.0))


# ---- value loss ---------------------------------------------------------------------------

VALUE_LOSS_CASES = [dict(token_level_loss=True), dict(token_level_loss=False),
                    dict(token_level_loss=True, dp_size=4, batch_num_tokens=61.0),
                    dict(token_level_loss=False, dp_size=2, global_batch_size=9.0)]


@pytest.mark.parametrize("case", VALUE_LOSS_CASES)
@pytest.mark.parametrize("clip", [0.2, 0.0])
def test_value_loss_matches_with_gradients(patched, case, clip, rng):
    original, new = patched
    case = dict(case)
    token_level = case.pop("token_level_loss")
    batch, length = 6, 13
    values, old, returns = (torch.randn(batch, length, generator=rng) for _ in range(3))
    mask = _masks(batch, length, rng)
    module = ValueLoss(clip, token_level)
    x_ref, x_new = values.clone().requires_grad_(), values.clone().requires_grad_()
    want = original.value_forward(module, x_ref, old, returns, mask, **case)
    got = new.value_forward(module, x_new, old, returns, mask, **case)
    assert got.dtype == want.dtype == torch.float32 and got.shape == ()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    (g_want,), (g_got,) = torch.autograd.grad(want, x_ref), torch.autograd.grad(got, x_new)
    assert torch.allclose(g_got, g_want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("case", ["no clip", "no mask", "weights as mask"])
def test_value_loss_cases_the_op_does_not_cover_go_to_openrlhf(patched, case, rng):
    original, new = patched
    values, old, returns = (torch.randn(3, 4, generator=rng) for _ in range(3))
    mask = {"no mask": None, "weights as mask": torch.rand(3, 4, generator=rng)}.get(
        case, torch.ones(3, 4))
    module = ValueLoss(None if case == "no clip" else 0.2)
    want = original.value_forward(module, values, old, returns, mask)
    assert torch.equal(new.value_forward(module, values, old, returns, mask), want)
