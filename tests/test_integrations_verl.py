"""rlhf_kernels.integrations.verl: patched functions against veRL's behaviour.

veRL does not import here (ray, tensordict, omegaconf, ...): the tests run against a stand-in
package whose functions are float64 oracles written from veRL 0.9's documented behaviour (see
integration_helpers); against the installed package too when it imports.
"""
import functools
import importlib
import math
import sys
import types

import pytest
import torch

from gae_oracle import error_bound
from integration_helpers import absent, importable, standin_package
from logprobs_oracle import fwd_tolerance, grad_tolerance
from rlhf_kernels.integrations import verl as rk_verl

FUNCTIONAL, ALGOS = "verl.utils.torch_functional", "verl.trainer.ppo.core_algos"
ROLLOUT = "verl.workers.rollout.naive.naive_rollout"


# ---- float64 oracles of the patched functions ---------------------------------------------

def logprobs_from_logits(logits, labels, inplace_backward=True):
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.long()[..., None])[..., 0]
    return logp.to(logits.dtype)


def entropy_from_logits(logits):
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1).to(logits.dtype)


def entropy_from_logits_with_chunking(logits, chunk_size=2048):
    if logits.dim() != 2:
        raise RuntimeError("veRL's chunked entropy takes [N, V] logits only")
    return entropy_from_logits(logits.double()).to(torch.get_default_dtype())


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """By definition: GAE on each row's valid positions, compacted; a masked position takes the
    advantage of the next valid one (0 after the last); whitened everywhere with the mean and
    unbiased variance of the valid advantages."""
    if response_mask.dtype == torch.bool:
        raise RuntimeError("veRL computes 1 - mask, which torch refuses for bool tensors")
    valid = response_mask != 0
    if valid.sum() < 2:
        raise ValueError("veRL's masked_var needs at least two valid tokens")
    r, v = token_level_rewards.double(), values.double()
    adv = torch.zeros_like(r)
    for b in range(r.shape[0]):
        (idx,) = torch.nonzero(valid[b], as_tuple=True)
        rv, vv = r[b, idx], v[b, idx]
        delta = rv + gamma * torch.cat([vv[1:], vv.new_zeros(1)]) - vv
        a, last = torch.zeros_like(delta), 0.0
        for j in reversed(range(len(idx))):
            last = float(delta[j]) + gamma * lam * last
            a[j] = last
        for t in range(r.shape[1]):
            later = (idx >= t).nonzero()
            adv[b, t] = a[later[0, 0]] if len(later) else 0.0
    returns = adv + v
    chosen = adv[valid]
    whitened = (adv - chosen.mean()) / torch.sqrt(chosen.var(unbiased=True) + 1e-8)
    dtype = torch.promote_types(token_level_rewards.dtype, values.dtype)
    if response_mask.is_floating_point():
        dtype = torch.promote_types(dtype, response_mask.dtype)
    return whitened.to(dtype), returns.to(dtype)


def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value,
                       loss_agg_mode="token-mean", dp_size=1, batch_num_tokens=None,
                       global_batch_size=None, loss_scale_factor=None):
    v, ret, old = vpreds.double(), returns.double(), values.double()
    unclipped = (v - ret) ** 2
    clipped = (torch.clamp(v, old - cliprange_value, old + cliprange_value) - ret) ** 2
    per_token, m = torch.maximum(unclipped, clipped), response_mask.double()
    row_sums, row_counts = (per_token * m).sum(-1), m.sum(-1)
    kept = row_counts > 0
    if loss_agg_mode in ("token-mean", "token-sum"):
        if loss_agg_mode == "token-mean" and batch_num_tokens is None and dp_size > 1:
            raise ValueError("batch_num_tokens is required when dp_size > 1")
        count = 1.0 if loss_agg_mode == "token-sum" else (
            m.sum() if batch_num_tokens is None else batch_num_tokens)
        total = (per_token * m).sum() / count * dp_size
    elif loss_agg_mode.startswith("seq-mean-"):
        if global_batch_size is None and dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        rows = kept.sum() if global_batch_size is None else global_batch_size
        per_row = (row_sums / row_counts.clamp(min=1) if loss_agg_mode.endswith("token-mean")
                   else row_sums)
        total = per_row[kept].sum() / rows * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            total = total / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        elif loss_agg_mode not in ("seq-mean-token-sum", "seq-mean-token-mean"):
            raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    float_mask = [response_mask.dtype] if response_mask.is_floating_point() else []
    loss_dtype = functools.reduce(torch.promote_types,
                                  [vpreds.dtype, returns.dtype, values.dtype] + float_mask)
    clipfrac_dtype = functools.reduce(torch.promote_types, [torch.float32] + float_mask)
    clipfrac = ((clipped > unclipped).double() * m).sum() / m.sum().clamp(min=1)
    return (0.5 * total).to(loss_dtype), clipfrac.to(clipfrac_dtype)


def compute_grpo_outcome_advantage(*args, **kwargs):
    raise NotImplementedError("another registry entry, which patch() must leave alone")


STANDIN = {FUNCTIONAL: dict(logprobs_from_logits=logprobs_from_logits,
                            entropy_from_logits=entropy_from_logits,
                            entropy_from_logits_with_chunking=entropy_from_logits_with_chunking,
                            FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE=False),
           ROLLOUT: dict(logprobs_from_logits=logprobs_from_logits),
           ALGOS: dict(compute_gae_advantage_return=compute_gae_advantage_return,
                       compute_value_loss=compute_value_loss,
                       ADV_ESTIMATOR_REGISTRY={"gae": compute_gae_advantage_return,
                                               "grpo": compute_grpo_outcome_advantage})}
INSTALLED, WHY_NOT = importable(ALGOS)
_ = importable(ROLLOUT)  # so that its by-name copy is there to be patched, when it imports


@pytest.fixture(params=["stand-in"] + (["installed"] if INSTALLED else []))
def lib(request):
    """The modules, unpatched; every test leaves them unpatched."""
    def modules():
        return types.SimpleNamespace(functional=importlib.import_module(FUNCTIONAL),
                                     algos=importlib.import_module(ALGOS))
    if request.param == "installed":
        yield modules()
    else:
        with standin_package("verl", STANDIN):
            yield modules()
    rk_verl.unpatch()


NAMES = ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking",
         "compute_gae_advantage_return", "compute_value_loss")


def _grab(lib):
    get = lambda n: getattr(lib.functional if "logits" in n else lib.algos, n)  # noqa: E731
    return types.SimpleNamespace(**{n: get(n) for n in NAMES})


@pytest.fixture
def patched(lib):
    """(originals, patched) namespaces of the functions under test."""
    before = _grab(lib)
    rk_verl.patch()
    return before, _grab(lib)


def _mask(batch, length, gen, dtype=torch.int64):
    """Right padding, left padding, holes in the middle, a full row, an empty row."""
    m = torch.rand(batch, length, generator=gen) < 0.7
    m[0], m[1], m[2], m[-1] = (torch.arange(length) < length // 2,
                               torch.arange(length) >= length // 3, True, False)
    return m.to(dtype)


# ---- the mechanism ------------------------------------------------------------------------

@pytest.mark.skipif(not INSTALLED, reason=f"the tests ran on the stand-in only: {WHY_NOT}")
def test_the_installed_verl_was_tested_too():
    """Every test above and below also ran against the installed veRL."""


def test_patch_covers_registry_and_copies_and_unpatch_restores_them(lib):
    before = _grab(lib)
    report = rk_verl.patch()
    assert f"{FUNCTIONAL}.logprobs_from_logits -> rlhf_kernels.logprobs" in report
    assert any(line.startswith(f"{ALGOS}.ADV_ESTIMATOR_REGISTRY['gae'] -> rlhf_kernels.gae")
               for line in report)
    if ROLLOUT in sys.modules:
        assert f"{ROLLOUT}.logprobs_from_logits -> rlhf_kernels.logprobs" in report
        assert sys.modules[ROLLOUT].logprobs_from_logits is lib.functional.logprobs_from_logits
    registry = lib.algos.ADV_ESTIMATOR_REGISTRY
    assert registry["gae"] is lib.algos.compute_gae_advantage_return
    assert registry["gae"] is not before.compute_gae_advantage_return
    assert registry["grpo"].__name__ == "compute_grpo_outcome_advantage"
    assert rk_verl.patch() == report and rk_verl.is_patched()  # idempotent
    assert set(rk_verl.unpatch()) == {f"{m}.{n}" for m, n in (
        (FUNCTIONAL, "logprobs_from_logits"), (FUNCTIONAL, "entropy_from_logits"),
        (FUNCTIONAL, "entropy_from_logits_with_chunking"),
        (ALGOS, "compute_gae_advantage_return"), (ALGOS, "compute_value_loss"))}
    after = _grab(lib)
    assert all(getattr(after, n) is getattr(before, n) for n in NAMES)
    assert registry["gae"] is before.compute_gae_advantage_return
    if ROLLOUT in sys.modules:
        assert sys.modules[ROLLOUT].logprobs_from_logits is before.logprobs_from_logits


def test_patch_without_verl_raises_import_error_naming_it():
    with absent("verl"), pytest.raises(ImportError, match="'verl'.*pip install verl"):
        rk_verl.patch()
    assert not rk_verl.is_patched()


def test_a_missing_module_or_a_changed_signature_skips_that_target_only(monkeypatch):
    from rlhf_kernels.integrations import _patching
    monkeypatch.setattr(_patching, "installed_version", lambda *_: "0.10.0")

    def changed_gae(token_level_rewards, values, response_mask, config):  # a newer shape
        return compute_gae_advantage_return(token_level_rewards, values, response_mask, 1, 1)
    algos = dict(STANDIN[ALGOS], compute_gae_advantage_return=changed_gae)
    with standin_package("verl", {**STANDIN, ALGOS: algos}) as mods:
        sys.modules[FUNCTIONAL] = None  # as when its imports fail
        try:
            report = rk_verl.patch()
            assert report == [f"{ALGOS}.compute_value_loss -> rlhf_kernels.ppo_critic_loss"]
            assert mods[ALGOS].compute_gae_advantage_return is changed_gae
            skipped = rk_verl.skipped()
            assert [line.split(":")[0] for line in skipped] == [
                f"{FUNCTIONAL}.logprobs_from_logits", f"{FUNCTIONAL}.entropy_from_logits",
                f"{FUNCTIONAL}.entropy_from_logits_with_chunking",
                f"{ALGOS}.compute_gae_advantage_return"]
            assert all(f"{FUNCTIONAL} does not import" in line for line in skipped[:3])
            assert "verl 0.10.0 is outside the tested versions >=0.9,<0.10" in skipped[3]
        finally:
            rk_verl.unpatch()


# ---- log-probs and entropy ----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 1, 1), (9, 130), (2, 2, 3, 17)])
def test_logprobs_match_with_gradients(patched, shape, rng):
    original, new = patched
    logits = torch.randn(shape, generator=rng) * 4
    labels = torch.randint(0, shape[-1], shape[:-1], generator=rng)
    x_ref, x_new = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want = original.logprobs_from_logits(x_ref, labels)
    got = new.logprobs_from_logits(x_new, labels, inplace_backward=True)
    tol = 2 * fwd_tolerance(logits, 1.0, shape[-1])
    assert got.dtype == want.dtype == torch.float32 and (got - want).abs().max() <= tol
    weights = torch.randn(shape[:-1], generator=rng)
    (g_want,) = torch.autograd.grad((want * weights).sum(), x_ref)
    (g_got,) = torch.autograd.grad((got * weights).sum(), x_new)
    assert (g_got - g_want).abs().max() <= grad_tolerance(g_want, tol, torch.float32)
    assert torch.equal(x_new, logits)  # inplace_backward is not taken up: logits stay intact


def test_logprobs_dtype_follows_veRL_flash_attention_switch(patched, monkeypatch, rng):
    original, new = patched
    logits = torch.randn(3, 4, 29, generator=rng).bfloat16()
    labels = torch.randint(0, 29, (3, 4), generator=rng)
    exact = logprobs_from_logits(logits.double(), labels)
    got = new.logprobs_from_logits(logits, labels)
    assert got.dtype == original.logprobs_from_logits(logits, labels).dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= 2 ** -7 * exact.abs() + 1e-6).all()
    functional = sys.modules[FUNCTIONAL]
    monkeypatch.setattr(functional, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True)
    got = new.logprobs_from_logits(logits, labels)  # where veRL would use flash-attn's CE
    assert got.dtype == torch.float32 and (got.double() - exact).abs().max() < 1e-4
    monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "1")
    assert new.logprobs_from_logits(logits, labels).dtype == torch.bfloat16


@pytest.mark.parametrize("name,shape,dtype", [
    ("entropy_from_logits", (3, 5, 37), torch.float32),
    ("entropy_from_logits", (4, 31), torch.bfloat16),
    ("entropy_from_logits_with_chunking", (7, 33), torch.float32),
    ("entropy_from_logits_with_chunking", (7, 33), torch.bfloat16)])
def test_entropies_match_with_gradients(patched, name, shape, dtype, rng):
    original, new = patched
    logits = (torch.randn(shape, generator=rng) * 3).to(dtype)
    x_ref, x_new = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want, got = getattr(original, name)(x_ref), getattr(new, name)(x_new)
    assert got.dtype == want.dtype and got.shape == shape[:-1]
    exact = entropy_from_logits(logits.double())
    rel = 2 ** -7 if got.dtype == torch.bfloat16 else 0.0
    tol = 2 * fwd_tolerance(logits.float(), 1.0, shape[-1]) + rel * exact.abs()
    assert ((got.double() - exact).abs() <= tol).all()
    if dtype == torch.float32:
        weights = torch.randn(shape[:-1], generator=rng)
        (g_want,) = torch.autograd.grad((want * weights).sum(), x_ref)
        (g_got,) = torch.autograd.grad((got * weights).sum(), x_new)
        assert (g_got - g_want).abs().max() <= grad_tolerance(g_want, tol.max().item(), dtype)


def test_chunked_entropy_of_3d_logits_is_left_to_veRL(patched):
    original, new = patched
    logits = torch.randn(2, 3, 5)
    with pytest.raises(RuntimeError):
        original.entropy_from_logits_with_chunking(logits)
    with pytest.raises(RuntimeError):
        new.entropy_from_logits_with_chunking(logits)


# ---- GAE ----------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32])
def test_gae_skips_masked_positions_carries_and_whitens_as_veRL(patched, gamma, lam,
                                                                mask_dtype, rng):
    original, new = patched
    batch, length = 5, 21
    rewards, values = torch.randn(batch, length, generator=rng), torch.randn(batch, length,
                                                                             generator=rng)
    mask = _mask(batch, length, rng, mask_dtype)
    want = original.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    got = new.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    exact = compute_gae_advantage_return(rewards.double(), values.double(), mask, gamma, lam)
    raw = exact[1] - values.double()  # the advantages before whitening
    rstd = 1 / raw[mask != 0].std().item()
    bound = error_bound(rewards, values, mask, raw.numpy(), gamma, lam,
                        scan_depth=math.ceil(math.log2(length)))
    # whitening: A's error, the mean's and the variance's (relative ~ error / std) scaled
    # by 1/std; plus a few roundings of the result
    whitened_max = exact[0].abs().max().item()
    tols = (2 * bound * rstd * (1 + whitened_max), 2 * bound)
    for g, w, e, tol in zip(got, want, exact, tols):
        assert g.dtype == w.dtype == torch.float32 and g.shape == (batch, length)
        tol += 8 * 2 ** -24 * e.abs().max().item()
        assert (g.double() - e).abs().max() <= tol and (w.double() - e).abs().max() <= tol
    adv = got[0]  # a hole before a valid token carries that token's (whitened) advantage
    first = length // 3
    assert torch.equal(adv[1, :first], adv[1, first].expand(first))


@pytest.mark.parametrize("case", ["float64", "one valid token", "bool mask", "lam>1"])
def test_gae_inputs_the_kernel_cannot_take_go_to_veRL(patched, case, rng):
    original, new = patched
    rewards, values = torch.randn(2, 6, generator=rng), torch.randn(2, 6, generator=rng)
    mask, lam = torch.ones(2, 6, dtype=torch.int64), 0.95
    if case == "float64":
        rewards, values = rewards.double(), values.double()
    elif case == "one valid token":
        mask.zero_()[0, 2] = 1
    elif case == "bool mask":
        mask = mask.bool()
    else:
        lam = 1.5
    try:
        want = original.compute_gae_advantage_return(rewards, values, mask, 1.0, lam)
    except Exception as e:  # veRL's own error, raised again through the patched function
        with pytest.raises(type(e)):
            new.compute_gae_advantage_return(rewards, values, mask, 1.0, lam)
        return
    got = new.compute_gae_advantage_return(rewards, values, mask, 1.0, lam)
    assert all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want))


# ---- value loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode,extra", [
    ("token-mean", {}), ("token-mean", dict(dp_size=4, batch_num_tokens=50)),
    ("token-sum", dict(dp_size=2)), ("seq-mean-token-sum", {}),
    ("seq-mean-token-sum", dict(dp_size=2, global_batch_size=12)),
    ("seq-mean-token-sum-norm", {}), ("seq-mean-token-sum-norm", dict(loss_scale_factor=7)),
    ("seq-mean-token-mean", {}), ("seq-mean-token-mean", dict(dp_size=3, global_batch_size=10))])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32])
def test_value_loss_matches_every_aggregation(patched, mode, extra, mask_dtype, rng):
    original, new = patched
    batch, length = 6, 11
    vpreds, returns, values = (torch.randn(batch, length, generator=rng) for _ in range(3))
    mask = _mask(batch, length, rng, mask_dtype)
    x_ref, x_new = vpreds.clone().requires_grad_(), vpreds.clone().requires_grad_()
    want = original.compute_value_loss(x_ref, returns, values, mask, 0.3, mode, **extra)
    got = new.compute_value_loss(x_new, returns, values, mask, 0.3, mode, **extra)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == ()
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-7)
    (g_want,), (g_got,) = torch.autograd.grad(want[0], x_ref), torch.autograd.grad(got[0], x_new)
    assert torch.allclose(g_got, g_want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("case", ["unknown mode", "dp without counts", "weights as mask"])
def test_value_loss_cases_the_op_does_not_cover_go_to_veRL(patched, case, rng):
    original, new = patched
    vpreds, returns, values = (torch.randn(3, 4, generator=rng) for _ in range(3))
    mask = torch.rand(3, 4, generator=rng) if case == "weights as mask" else torch.ones(3, 4)
    args = (vpreds, returns, values, mask, 0.2, "token-max" if case == "unknown mode" else
            "token-mean", 2 if case == "dp without counts" else 1)
    if case == "weights as mask":
        assert all(torch.equal(g, w) for g, w in zip(new.compute_value_loss(*args),
                                                     original.compute_value_loss(*args)))
        return
    with pytest.raises(ValueError):
        original.compute_value_loss(*args)
    with pytest.raises(ValueError):
        new.compute_value_loss(*args)


def test_value_loss_mode_veRL_rejects_stays_rejected(patched, rng):
    """token-sum is a loss_agg_mode of veRL 0.9; 0.7 and 0.8 reject it (ValueError), and so
    must compute_value_loss after patch() there (tests/test_peer_versions.py runs this)."""
    original, new = patched
    vpreds, returns, values = (torch.randn(3, 4, generator=rng) for _ in range(3))
    args = (vpreds, returns, values, torch.ones(3, 4), 0.2, "token-sum")
    try:
        want = original.compute_value_loss(*args)
    except ValueError:
        with pytest.raises(ValueError):
            new.compute_value_loss(*args)
        return
    got = new.compute_value_loss(*args)
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-7) for g, w in zip(got, want))
