"""rlhf_kernels.integrations.trl against the installed TRL: the same inputs through TRL's own
functions and through the patched ones.

Written for the main venv's TRL (1.16); tests/test_peer_versions.py also runs the tests of the
functions an older pinned TRL has (e.g. `-k entropy_from_logits` on 1.12, which has neither
trl.kernels nor trl.experimental.sdpo), so those two imports are optional here."""
import importlib
import inspect
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

from logprobs_oracle import fwd_tolerance, grad_tolerance, logprobs64
from rlhf_kernels.integrations import trl as rk_trl

utils = pytest.importorskip("trl.trainer.utils", reason="needs trl (pip install trl)")


def _optional(module: str):
    try:
        with warnings.catch_warnings():  # "trl.experimental is unstable"
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError:  # an older pinned TRL
        return None


chunked = _optional("trl.kernels.chunked_logprob")
sdpo_loss_utils = _optional("trl.experimental.sdpo.loss_utils")  # a `from ... import` copy

NAMES = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
BF16_ULP = 2 ** -7  # relative spacing of bfloat16 numbers, at most


def _grab():
    return types.SimpleNamespace(**{n: getattr(utils, n, None) for n in NAMES},
                                 chunked=getattr(chunked, "ChunkedLogProbFunction", None))


@pytest.fixture
def patched():
    """(TRL's functions, the patched ones); TRL is unpatched again afterwards."""
    before = _grab()
    rk_trl.patch()
    yield before, _grab()
    rk_trl.unpatch()


def _grads(fn, x, weights_list):
    """d(sum_i w_i * out_i)/dx for the outputs of fn(x) (a tensor or a tuple)."""
    x = x.detach().clone().requires_grad_()
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o.float() * w).sum() for o, w in zip(outs, weights_list) if o is not None)
    return outs, torch.autograd.grad(total, x)[0]


# ---- the mechanism ------------------------------------------------------------------------

def test_patch_reports_replaces_copies_and_unpatch_restores_identity():
    before = _grab()
    report = rk_trl.patch()
    try:
        for name in NAMES:
            assert any(line.startswith(f"trl.trainer.utils.{name} -> rlhf_kernels.logprobs")
                       for line in report)
        assert ("trl.experimental.sdpo.loss_utils.selective_log_softmax -> rlhf_kernels.logprobs"
                in report)
        assert ("trl.trainer.utils._ChunkedLogProbFunction -> "
                "rlhf_kernels.fused_linear_logprobs" in report)
        assert sdpo_loss_utils.selective_log_softmax is utils.selective_log_softmax
        assert utils.selective_log_softmax is not before.selective_log_softmax
        assert rk_trl.patch() == report and rk_trl.is_patched()  # idempotent
        assert utils.selective_log_softmax.__wrapped__ is before.selective_log_softmax
        # a module that imports the patched function later is restored too
        late = types.ModuleType("trl._late_importer")
        late.f, late.registry = utils.entropy_from_logits, {"entropy": utils.entropy_from_logits}
        sys.modules[late.__name__] = late
    finally:
        restored = rk_trl.unpatch()
        sys.modules.pop("trl._late_importer", None)
    assert len(restored) == 4 and not rk_trl.is_patched()
    after = _grab()
    assert all(getattr(after, n) is getattr(before, n) for n in NAMES + ("chunked",))
    assert sdpo_loss_utils.selective_log_softmax is before.selective_log_softmax
    assert utils._ChunkedLogProbFunction is before.chunked
    assert late.f is late.registry["entropy"] is before.entropy_from_logits
    assert rk_trl.unpatch() == []


def test_signatures_are_unchanged(patched):
    before, after = patched
    for name in NAMES:
        assert (inspect.signature(getattr(after, name), follow_wrapped=False)
                == inspect.signature(getattr(before, name)))
    forward = list(inspect.signature(before.chunked.forward).parameters.values())[1:]
    assert list(inspect.signature(after.chunked.apply).parameters.values()) == forward


def test_importing_the_integrations_imports_no_trainer():
    code = ("import sys, rlhf_kernels.integrations.trl, rlhf_kernels.integrations.openrlhf, "
            "rlhf_kernels.integrations.verl\n"
            "print([m for m in ('trl', 'openrlhf', 'verl', 'deepspeed', 'transformers', 'rlhf')"
            " if m in sys.modules])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- log-probs and entropy ----------------------------------------------------------------

SHAPES = [(3, 5, 37), (7, 129), (2, 3, 2, 19), (1, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_row_mask", [False, True])
def test_selective_log_softmax_matches_with_gradients(patched, shape, temperature,
                                                      with_row_mask, rng):
    before, after = patched
    logits = torch.randn(shape, generator=rng) * 4
    index = torch.randint(0, shape[-1], shape[:-1], generator=rng)
    row_mask = (torch.rand(shape[:-1], generator=rng) < 0.7) if with_row_mask else None
    weights = [torch.randn(shape[:-1], generator=rng)]
    (want,), g_want = _grads(lambda x: before.selective_log_softmax(x, index, temperature,
                                                                    row_mask), logits, weights)
    (got,), g_got = _grads(lambda x: after.selective_log_softmax(x, index, temperature,
                                                                 row_mask), logits, weights)
    tol = 2 * fwd_tolerance(logits, temperature, shape[-1])
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max() <= tol
    assert (g_got - g_want).abs().max() <= grad_tolerance(g_want, tol, torch.float32)
    if row_mask is not None:
        assert torch.equal(got[~row_mask], torch.zeros_like(got[~row_mask]))


def test_skipped_rows_may_hold_any_label(patched, rng):
    _, after = patched
    logits = torch.randn(4, 6, 11, generator=rng)
    index = torch.randint(0, 11, (4, 6), generator=rng)
    row_mask = torch.rand(4, 6, generator=rng) < 0.5
    padded = torch.where(row_mask, index, -100)  # TRL's ignore index, out of the vocabulary
    logp, entropy = after.selective_log_softmax_and_entropy(logits, padded, row_mask=row_mask)
    want, want_h = logprobs64(logits, index)
    assert torch.allclose(logp.double(), torch.where(row_mask, want, 0.0), atol=1e-5)
    assert torch.allclose(entropy.double(), torch.where(row_mask, want_h, 0.0), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES + [(13,)])
def test_entropy_from_logits_matches_with_gradients(patched, shape, rng):
    before, after = patched
    logits = torch.randn(shape, generator=rng) * 3
    weights = [torch.randn(shape[:-1], generator=rng)]
    (want,), g_want = _grads(before.entropy_from_logits, logits, weights)
    (got,), g_got = _grads(after.entropy_from_logits, logits, weights)
    tol = 2 * fwd_tolerance(logits, 1.0, shape[-1])
    assert got.dtype == want.dtype and got.shape == want.shape
    assert (got - want).abs().max() <= tol
    assert (g_got - g_want).abs().max() <= grad_tolerance(g_want, tol, torch.float32)


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_logprobs_and_entropy_in_one_pass_match(patched, entropy_requires_grad, rng):
    before, after = patched
    logits = torch.randn(3, 7, 45, generator=rng) * 3
    index = torch.randint(0, 45, (3, 7), generator=rng)
    row_mask = torch.rand(3, 7, generator=rng) < 0.8
    weights = [torch.randn(3, 7, generator=rng) for _ in range(2)]
    if not entropy_requires_grad:
        weights[1] = torch.zeros(3, 7)  # the entropy carries no graph then

    def call(fn):
        return lambda x: fn(x, index, entropy_requires_grad, 0.8, row_mask)
    want, g_want = _grads(call(before.selective_log_softmax_and_entropy), logits, weights)
    got, g_got = _grads(call(after.selective_log_softmax_and_entropy), logits, weights)
    tol = 2 * fwd_tolerance(logits, 0.8, 45)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and (g - w).abs().max() <= tol
    assert got[1].requires_grad == want[1].requires_grad == entropy_requires_grad
    assert (g_got - g_want).abs().max() <= grad_tolerance(g_want, tol, torch.float32)


def test_bf16_logits_give_bf16_on_cpu_as_trl(patched, rng):
    before, after = patched
    logits = (torch.randn(4, 5, 67, generator=rng) * 3).bfloat16()
    index = torch.randint(0, 67, (4, 5), generator=rng)
    exact_logp, exact_h = logprobs64(logits, index)
    got_logp = after.selective_log_softmax(logits, index)
    got_h = after.entropy_from_logits(logits)
    assert got_logp.dtype == before.selective_log_softmax(logits, index).dtype == torch.bfloat16
    assert got_h.dtype == before.entropy_from_logits(logits).dtype == torch.bfloat16
    for got, exact in ((got_logp, exact_logp), (got_h, exact_h)):  # one rounding to bf16
        assert ((got.double() - exact).abs() <= BF16_ULP * exact.abs() + 1e-6).all()


def test_what_the_kernel_does_not_cover_goes_to_trl(patched, rng):
    before, after = patched
    logits = torch.randn(2, 3, 10, generator=rng)
    top_k = torch.randint(0, 10, (2, 3, 4), generator=rng)  # K labels per row
    assert torch.equal(after.selective_log_softmax(logits, top_k),
                       before.selective_log_softmax(logits, top_k))
    vector, label = logits[0, 0], top_k[0, 0, 0]  # 1-D logits: TRL's own (odd) broadcast
    assert torch.equal(after.selective_log_softmax(vector, label),
                       before.selective_log_softmax(vector, label))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be positive"):
            after.selective_log_softmax(logits, top_k[..., 0], temperature=bad)


def test_out_of_range_labels_raise_a_clear_error(patched):
    _, after = patched
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        after.selective_log_softmax(torch.randn(2, 3, 10), torch.full((2, 3), 10))


# ---- the fused LM head (GRPO, RLOO) ------------------------------------------------------

def _head_inputs(gen, n=37, hidden=24, vocab=91, dtype=torch.float32):
    h = torch.randn(n, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5 * 3).to(dtype)
    return h, w, torch.randint(0, vocab, (n,), generator=gen)


def _head_run(function, h, w, targets, outputs, gen, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = function.apply(h, w, kw.pop("bias", None), targets, 0.9, 32768, None, 1.0, outputs)
    weights = torch.Generator().manual_seed(1)
    total = sum((o.float() * torch.randn(o.shape, generator=weights)).sum()
                for o in out[:2] if o is not None)
    return out, torch.autograd.grad(total, (h, w))


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")])
def test_fused_head_matches_trl_with_gradients(patched, outputs, rng):
    before, after = patched
    h, w, targets = _head_inputs(rng)
    want, g_want = _head_run(before.chunked, h, w, targets, outputs, rng)
    got, g_got = _head_run(after.chunked, h, w, targets, outputs, rng)
    assert [o is None for o in got] == [o is None for o in want]
    tol = 2 * fwd_tolerance(h @ w.T, 0.9, w.shape[0])
    for g, x in zip(got[:2], want[:2]):
        if x is not None:
            assert g.dtype == x.dtype == torch.float32 and (g - x).abs().max() <= tol
    for g, x in zip(g_got, g_want):
        assert g.dtype == x.dtype and (g - x).abs().max() <= grad_tolerance(x, tol, x.dtype)


def test_fused_head_under_bf16_autocast_projects_in_bf16_as_trl(patched, rng):
    before, after = patched
    h, w, targets = _head_inputs(rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, g_want = _head_run(before.chunked, h, w, targets, ("log_probs", "entropy"), rng)
        got, g_got = _head_run(after.chunked, h, w, targets, ("log_probs", "entropy"), rng)
    # both project in bf16; the logits may differ by a bf16 rounding, and the log-probs with
    # them by about twice that relative to the largest logit
    zmax = (h @ w.T).abs().max().item() / 0.9
    for g, x in zip(got[:2], want[:2]):
        assert g.dtype == x.dtype == torch.float32
        assert (g - x).abs().max() <= 4 * BF16_ULP * zmax
    for g, x in zip(g_got, g_want):
        assert g.dtype == x.dtype == torch.float32
        assert (g - x).abs().max() <= 4 * BF16_ULP * x.abs().max()


@pytest.mark.parametrize("case", ["bias", "is_top1"])
def test_fused_head_options_the_kernel_lacks_go_to_trl(patched, case, rng):
    before, after = patched
    h, w, targets = _head_inputs(rng)
    bias = torch.randn(w.shape[0], generator=rng) if case == "bias" else None
    outputs = ("log_probs", "entropy", "is_top1") if case == "is_top1" else ("log_probs",)
    want, _ = _head_run(before.chunked, h, w, targets, outputs, rng, bias=bias)
    got, _ = _head_run(after.chunked, h, w, targets, outputs, rng, bias=bias)
    assert all((g is None and x is None) or torch.equal(g, x) for g, x in zip(got, want))


def test_fused_lm_head_of_a_model_matches(rng):
    """`model(..., fused_lm_head=True)`, as GRPO calls it, on a tiny Llama."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = transformers.LlamaForCausalLM(config)
    utils.add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 67, (3, 9), generator=rng)
    labels = ids.masked_fill(torch.rand(3, 9, generator=rng) < 0.3, -100)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}
    want, g_want = run()
    trl_function = utils._ChunkedLogProbFunction
    rk_trl.patch()  # the head looks its autograd Function up at each call
    try:
        assert utils._ChunkedLogProbFunction.__wrapped__ is trl_function
        got, g_got = run()
    finally:
        rk_trl.unpatch()
    for field in ("log_probs", "entropy", "loss"):
        assert torch.allclose(getattr(got, field), getattr(want, field), atol=2e-5, rtol=1e-5)
    for name, g in g_got.items():
        assert torch.allclose(g, g_want[name], atol=1e-5, rtol=1e-4), name


# ---- declining what the patch does not know -----------------------------------------------

def test_fused_head_replacement_is_an_autograd_function_reading_the_chunk_size_per_call(
        patched, monkeypatch, rng):
    before, after = patched
    assert issubclass(after.chunked, torch.autograd.Function)
    assert issubclass(after.chunked, before.chunked)
    assert after.chunked.__wrapped__ is before.chunked
    chunks, op = [], rk_trl.fused_linear_logprobs

    def spy(*args, **kwargs):
        chunks.append(kwargs["chunk_size"])
        return op(*args, **kwargs)
    monkeypatch.setattr(rk_trl, "fused_linear_logprobs", spy)
    h, w, targets = _head_inputs(rng)  # vocab 91 < TRL's vocab chunk: TOKEN_CHUNK_SIZE tokens
    _head_run(after.chunked, h, w, targets, ("log_probs",), rng)
    monkeypatch.setattr(chunked, "TOKEN_CHUNK_SIZE", 8)  # after patch(): still takes effect
    _head_run(after.chunked, h, w, targets, ("log_probs",), rng)
    assert chunks == [4096, 8]


def test_a_fused_head_wrapped_without_functools_wraps_is_left_to_trl(monkeypatch, rng):
    forward = chunked.ChunkedLogProbFunction.forward

    def profiled(ctx, *args, **kwargs):  # a profiler's wrapper: no functools.wraps
        return forward(ctx, *args, **kwargs)
    monkeypatch.setattr(chunked.ChunkedLogProbFunction, "forward", staticmethod(profiled))
    h, w, targets = _head_inputs(rng)
    want, g_want = _head_run(utils._ChunkedLogProbFunction, h, w, targets, ("log_probs",), rng)
    try:
        report = rk_trl.patch()
        # a training step runs (it used to raise KeyError: 'hidden')
        got, g_got = _head_run(utils._ChunkedLogProbFunction, h, w, targets, ("log_probs",), rng)
        assert not any("ChunkedLogProbFunction" in line for line in report)
        assert any(line.startswith("trl.trainer.utils.selective_log_softmax") for line in report)
        (skip,) = rk_trl.skipped()
        assert skip.startswith("trl.kernels.chunked_logprob.ChunkedLogProbFunction: its forward")
        assert "does not name hidden, weight" in skip
    finally:
        rk_trl.unpatch()
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(g_got, g_want))


def test_outside_the_tested_versions_only_matching_signatures_are_patched(monkeypatch):
    from rlhf_kernels.integrations import _patching
    monkeypatch.setattr(_patching, "installed_version", lambda *_: "1.12.0")

    def entropy_from_logits(logits, chunk_size=128, dim=-1):  # a signature we do not know
        return NotImplemented
    monkeypatch.setattr(utils, "entropy_from_logits", entropy_from_logits)
    monkeypatch.setitem(sys.modules, "trl.kernels.chunked_logprob", None)  # as in TRL < 1.14
    try:
        report = rk_trl.patch()  # no ImportError for the missing submodule
        assert any(line.startswith("trl.trainer.utils.selective_log_softmax ->")
                   for line in report)
        assert any(line.startswith("trl.trainer.utils.selective_log_softmax_and_entropy ->")
                   for line in report)
        assert not any("entropy_from_logits" in line or "Chunked" in line for line in report)
        entropy_skip, kernel_skip = rk_trl.skipped()
        assert entropy_skip.startswith(
            "trl.trainer.utils.entropy_from_logits: trl 1.12.0 is outside the tested versions "
            ">=1.16,<1.17, and its signature (logits, chunk_size, dim) is not the one "
            "replaced (logits, chunk_size)")
        assert kernel_skip.startswith("trl.kernels.chunked_logprob.ChunkedLogProbFunction: "
                                      "trl.kernels.chunked_logprob does not import")
        assert utils.entropy_from_logits is entropy_from_logits
    finally:
        rk_trl.unpatch()


def test_outside_the_tested_versions_the_recorded_signatures_are_trl_1_16s(monkeypatch):
    from rlhf_kernels.integrations import _patching
    monkeypatch.setattr(_patching, "installed_version", lambda *_: None)
    try:
        rk_trl.patch()
        assert rk_trl.skipped() == [] and len(rk_trl.unpatch()) == 4
    finally:
        rk_trl.unpatch()


@pytest.mark.parametrize("version,inside", [("1.16.0", True), ("1.16.3.dev0", True),
                                            ("1.16", True), ("1.17.0", False), ("1.15.9", False),
                                            ("2.0", False), (None, False), ("main", False)])
def test_version_ranges(version, inside):
    from rlhf_kernels.integrations._patching import in_range
    assert in_range(version, rk_trl.TESTED_VERSIONS) is inside
