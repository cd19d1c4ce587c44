"""Non-finite logits on every sampling backend (the rule in rlhf_kernels/reference/sample.py),
generate() on a model that produces NaN, and bad inputs that must be clear errors naming the
argument instead of internal ones (meta tensors, D = 0, token ids out of range, options that
are no numbers).

The NaN cases run in a child process under a timeout: the CPU sampler used to spin forever on a
NaN row with top_p < 1, and a hang must fail the test, not stall the suite.
"""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rlhf_kernels
from rlhf_kernels.generation import generate
from rlhf_kernels.reference import sample as ref_sample
from conftest import backend_params, device_for
from tiny_models import CONFIGS, FALLBACK, VOCAB, build, left_padded_prompts

INF, NAN = float("inf"), float("nan")
TESTS = os.path.dirname(os.path.abspath(__file__))
TEMPERATURE = 0.5


def nonfinite_logits():
    """[7, 6] rows: NaN, -inf everywhere, two +inf, finite, NaN and +inf, one +inf among
    -inf, a finite logit that the temperature 0.5 overflows to +inf (two of them)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 6, generator=g) * 2
    x[0, 3] = NAN
    x[1] = -INF
    x[2, 1] = x[2, 4] = INF
    x[4, 2], x[4, 5] = NAN, INF
    x[5] = -INF
    x[5, 2] = INF
    x[6, 0] = x[6, 3] = 3e38  # finite, but 3e38 / 0.5 is +inf in float32
    return x


# (row, uniform) -> the token the rule gives: a +inf row samples its +inf tokens uniformly,
# in index order (u < 1/2: the first of two)
UNIFORMS = [0.3, 0.6, 0.75, 0.5, 0.2, 0.9, 0.25]
EXPECTED_TOKENS = {0: ref_sample.NAN_ROW, 1: ref_sample.EMPTY_ROW, 2: 4, 4: ref_sample.NAN_ROW,
                   5: 2, 6: 0}
EXPECTED_LOGP = {2: -math.log(2), 5: 0.0, 6: -math.log(2)}
FILTERS = [(0, 1.0), (3, 1.0), (1, 1.0), (0, 0.9), (3, 0.5)]

CHILD = r"""
import json, sys
import torch
import rlhf_kernels
from rlhf_kernels.ops.decode import sample_kernel
sys.path.insert(0, TESTS)
from conftest import device_for
from test_nonfinite_and_bad_inputs import FILTERS, TEMPERATURE, UNIFORMS, nonfinite_logits

backend = sys.argv[1]
dev = device_for(backend)
kernel = sample_kernel(backend, dev)
logits, u = nonfinite_logits().to(dev), torch.tensor(UNIFORMS, device=dev)
out = {"kernel": [], "op": []}
for top_k, top_p in FILTERS:
    tokens, logp = kernel(logits, TEMPERATURE, top_k, top_p, u)
    out["kernel"].append([tokens.cpu().tolist(), logp.cpu().tolist()])
    if top_p == 1.0:  # (in process: test_public_sample_raises_on_nan_with_top_k_and_top_p_1)
        continue
    try:  # the public op raises, naming the rows
        rlhf_kernels.sample(logits, temperature=TEMPERATURE, top_k=top_k, top_p=top_p,
                            backend=backend)
        out["op"].append("no error")
    except ValueError as e:
        out["op"].append(str(e))
print("RESULT " + json.dumps(out))
""".replace("TESTS", repr(TESTS))


def run_child(code: str, *args: str, timeout: float = 300) -> str:
    """stdout of `code` in a fresh interpreter; a hang is a test failure, not a stalled suite."""
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                              capture_output=True, text=True, timeout=timeout, cwd=TESTS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish in {timeout} s: a non-finite row hangs the sampler")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("backend", backend_params("sample"))
def test_nonfinite_rows_follow_the_rule_and_never_hang(backend):
    out = run_child(CHILD, backend)
    result = json.loads(out.split("RESULT ", 1)[1])
    reference = [ref_sample.sample(nonfinite_logits(), TEMPERATURE, k, p,
                                   uniforms=torch.tensor(UNIFORMS)) for k, p in FILTERS]
    messages = iter(result["op"])
    for (top_k, top_p), (tokens, logp), (ref_tokens, ref_logp) in zip(
            FILTERS, result["kernel"], reference):
        case = f"top_k={top_k} top_p={top_p}"
        for row, want in EXPECTED_TOKENS.items():
            assert tokens[row] == want, f"{case}, row {row}: token {tokens[row]}"
            assert ref_tokens[row] == want, f"{case}, row {row}: reference {ref_tokens[row]}"
        for row in (0, 1, 4):
            assert math.isnan(logp[row]) and math.isnan(ref_logp[row]), (case, row)
        for row, want in EXPECTED_LOGP.items():
            assert logp[row] == pytest.approx(want, abs=1e-6), (case, row)
            assert float(ref_logp[row]) == pytest.approx(want, abs=1e-6), (case, row)
        # the finite row is untouched by the rule: the same token as the reference
        assert tokens[3] == int(ref_tokens[3]), case
        if top_p < 1.0:
            message = next(messages)
            assert ("logits row(s) [0, 4] hold NaN: the model produced NaN logits" in message
                    and "row(s) [1] are -inf everywhere" in message), f"{case}: {message}"


@pytest.mark.parametrize("backend", backend_params("sample"))
def test_public_sample_raises_on_nan_with_top_k_and_top_p_1(backend):
    """In process (these never hung): today's code returned token 0, log-prob NaN."""
    dev = device_for(backend)
    logits = torch.randn(3, 50).to(dev)
    logits[1, 7] = NAN
    for kwargs in (dict(), dict(top_k=5), dict(temperature=0)):
        with pytest.raises(ValueError, match=r"row\(s\) \[1\] hold NaN: the model produced NaN"):
            rlhf_kernels.sample(logits, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", backend_params("sample"))
def test_plus_inf_wins_every_draw(backend):
    dev = device_for(backend)
    logits = torch.randn(8, 30).to(dev)
    logits[:, 17] = INF
    for kwargs in (dict(), dict(top_k=4), dict(top_p=0.8), dict(temperature=0)):
        tokens, logp = rlhf_kernels.sample(logits, backend=backend, **kwargs)
        assert (tokens.cpu() == 17).all(), kwargs
        assert (logp.cpu() == 0).all(), kwargs


def test_greedy_reference_rule():
    z = torch.tensor([[1.0, INF, 2.0, INF], [-INF, -INF, -INF, -INF], [0.0, NAN, 1.0, 2.0],
                      [-INF, 3.0, -INF, 1.0]])
    tokens, logp = ref_sample.greedy(z)
    assert tokens.tolist() == [1, ref_sample.EMPTY_ROW, ref_sample.NAN_ROW, 1]
    assert logp[0].item() == pytest.approx(-math.log(2))
    assert math.isnan(logp[1]) and math.isnan(logp[2])
    assert logp[3].item() == pytest.approx(torch.log_softmax(z[3], -1)[1].item())


def test_sample_on_meta_gives_shapes():
    for temperature in (0.0, 1.0):
        tokens, logp = rlhf_kernels.sample(torch.empty(3, 11, device="meta"),
                                           temperature=temperature, top_p=0.9)
        assert tokens.shape == (3,) and logp.shape == (3,) and tokens.is_meta


# --------------------------------------------------------------------------------- generate

def nan_model(family="mistral-sliding-window", spec=None, token=5):
    """A tiny LM whose embedding of `token` is NaN: prompts holding it give NaN logits, the
    others stay finite (attention does not mix sequences)."""
    model = build(spec or CONFIGS[family], seed=2)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = NAN
    return model


def prompts_with_token(rows, rng, token=5):
    ids, mask = left_padded_prompts([5, 3, 4, 2], rng)
    ids[ids == token] = token + 1
    for row in rows:
        ids[row, -1] = token
    return ids, mask


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 0), (0.8, 10)])
def test_generate_with_nan_logits_raises_naming_the_rows(backend, temperature, top_k, rng):
    model = nan_model()
    ids, mask = prompts_with_token([1, 3], rng)
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1, 3\] hold NaN: the model produced "
                                         r"NaN logits.*first at new token 0"):
        generate(model, ids, mask, max_new_tokens=6, temperature=temperature, top_k=top_k,
                 eos_token_id=[], generator=rng, backend=backend)
    # the other rows alone are fine (one new token: a sampled NaN token is never fed back)
    keep = torch.tensor([0, 2])
    out = generate(model, ids[keep], mask[keep], max_new_tokens=1, temperature=temperature,
                   top_k=top_k, eos_token_id=[], generator=rng, backend=backend)
    assert out.path.startswith("fused:") and torch.isfinite(out.logprobs).all()
    # one new token: no check inside the loop, the one at the end of generation raises
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1, 3\] hold NaN"):
        generate(model, ids, mask, max_new_tokens=1, temperature=temperature, top_k=top_k,
                 eos_token_id=[], generator=rng, backend=backend)


def test_generate_with_nan_logits_and_top_p_never_hangs():
    out = run_child("""
        import sys, torch
        from test_nonfinite_and_bad_inputs import nan_model, prompts_with_token
        from rlhf_kernels.generation import generate
        ids, mask = prompts_with_token([0, 1, 2, 3], torch.Generator().manual_seed(0))
        try:
            generate(nan_model(), ids, mask, max_new_tokens=4, temperature=1.0, top_p=0.9,
                     eos_token_id=[])
            print("RESULT no error")
        except ValueError as e:
            print("RESULT", e)
        """, timeout=300)
    assert "sequence(s) [0, 1, 2, 3] hold NaN: the model produced NaN logits" in out, out


def test_generate_fallback_with_nan_logits_raises(rng):
    model = nan_model(spec=FALLBACK)
    ids, mask = prompts_with_token([2], rng)
    with pytest.raises(ValueError, match=r"sequences \[2\] got NaN log-probs: the model "
                                         r"produced NaN logits"):
        generate(model, ids, mask, max_new_tokens=1, temperature=0, eos_token_id=[])


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 100, -1])
@pytest.mark.parametrize("family", ["llama-gqa-tied", "gpt2"])
def test_generate_token_ids_out_of_range(family, bad_id, rng):
    model = build(CONFIGS[family], seed=1)
    ids, mask = left_padded_prompts([3, 4], rng)
    ids[1, -2] = bad_id
    with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, {VOCAB}\).*"
                                         r"prompts \[1\]"):
        generate(model, ids, mask, max_new_tokens=2)
    ids, mask = left_padded_prompts([3, 4], rng)
    ids[0, 0] = bad_id  # a padding position is embedded too
    with pytest.raises(ValueError, match=r"prompts \[0\]"):
        generate(model, ids, mask, max_new_tokens=2)


# ------------------------------------------------------------------------------ meta tensors

def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


META_CALLS = {
    "gae": lambda: rlhf_kernels.gae(_meta(2, 3), _meta(2, 3)),
    "logprobs": lambda: rlhf_kernels.logprobs(_meta(2, 3, 5), _meta(2, 3, dtype=torch.long)),
    "decode_attention": lambda: rlhf_kernels.decode_attention(
        _meta(2, 4, 8), _meta(2, 2, 8, 8), _meta(2, 2, 8, 8), _meta(2, dtype=torch.int32)),
    "ppo_actor_loss": lambda: rlhf_kernels.ppo_actor_loss(
        _meta(2, 3, 5), _meta(2, 3, dtype=torch.long), _meta(2, 3), _meta(2, 3),
        _meta(2, 3, dtype=torch.bool)),
    "fused_linear_logprobs": lambda: rlhf_kernels.fused_linear_logprobs(
        _meta(2, 3, 4), _meta(5, 4), _meta(2, 3, dtype=torch.long)),
    "fused_linear_ppo_actor_loss": lambda: rlhf_kernels.fused_linear_ppo_actor_loss(
        _meta(2, 3, 4), _meta(5, 4), _meta(2, 3, dtype=torch.long), _meta(2, 3), _meta(2, 3),
        _meta(2, 3, dtype=torch.bool)),
}


@pytest.mark.parametrize("op", list(META_CALLS))
def test_meta_tensors_are_a_clear_error(op):
    with pytest.raises(ValueError, match=rf"^{op}: \w+ is a meta tensor"):
        META_CALLS[op]()


def test_ppo_critic_loss_runs_on_meta():  # elementwise torch: it works, so it stays working
    out = rlhf_kernels.ppo_critic_loss(_meta(2, 3), _meta(2, 3), _meta(2, 3),
                                       _meta(2, 3, dtype=torch.bool))
    assert out.loss.is_meta and out.loss.shape == ()


# ------------------------------------------------------------------ other bad arguments

def test_decode_attention_head_dim_zero_and_no_kv_head():
    lengths = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="q has head dim D = 0"):
        rlhf_kernels.decode_attention(torch.randn(2, 4, 0), torch.randn(2, 2, 8, 0),
                                      torch.randn(2, 2, 8, 0), lengths)
    with pytest.raises(ValueError, match="k_cache has no KV head"):
        rlhf_kernels.decode_attention(torch.randn(2, 4, 8), torch.randn(2, 0, 8, 8),
                                      torch.randn(2, 0, 8, 8), lengths)
    with pytest.raises(TypeError, match="softmax_scale must be a real number"):
        rlhf_kernels.decode_attention(torch.randn(2, 4, 8), torch.randn(2, 2, 8, 8),
                                      torch.randn(2, 2, 8, 8), lengths, softmax_scale="x")


def _ppo_inputs(rng):
    b, t, v = 2, 3, 7
    return (torch.randn(b, t, v, generator=rng), torch.randint(0, v, (b, t), generator=rng),
            torch.randn(b, t, generator=rng) - 2, torch.randn(b, t, generator=rng),
            torch.ones(b, t, dtype=torch.bool))


PPO_FLOAT_OPTIONS = ["entropy_coef", "clip_low", "clip_high", "ratio_clamp", "dual_clip",
                     "kl_coef", "temperature"]


# every option x every non-number, except dual_clip=None, which means "off"
NOT_NUMBERS = [(option, value) for option in PPO_FLOAT_OPTIONS
               for value in ("0.1", None, [0.1], torch.ones(2))
               if not (option == "dual_clip" and value is None)]


@pytest.mark.parametrize("fused", [False, True], ids=["ppo_actor_loss", "fused_linear"])
@pytest.mark.parametrize("option, value", NOT_NUMBERS, ids=repr)
def test_ppo_actor_loss_float_option_not_a_number(option, value, fused, rng):
    logits, labels, old, adv, mask = _ppo_inputs(rng)
    kwargs = {option: value, "ref_logprobs": old.clone()}
    with pytest.raises(TypeError, match=rf"{option} must be a real number"):
        if fused:
            hidden, weight = torch.randn(2, 3, 4, generator=rng), torch.randn(7, 4, generator=rng)
            rlhf_kernels.fused_linear_ppo_actor_loss(hidden, weight, labels, old, adv, mask,
                                                     **kwargs)
        else:
            rlhf_kernels.ppo_actor_loss(logits, labels, old, adv, mask, **kwargs)


@pytest.mark.parametrize("option", ["entropy_coef", "kl_coef"])
def test_ppo_actor_loss_coefficients_must_be_finite(option, rng):
    logits, labels, old, adv, mask = _ppo_inputs(rng)
    with pytest.raises(ValueError, match=rf"{option} must be a finite number, got nan"):
        rlhf_kernels.ppo_actor_loss(logits, labels, old, adv, mask, ref_logprobs=old.clone(),
                                    **{option: NAN})


def test_ppo_actor_loss_numbers_of_any_kind_still_work(rng):
    import numpy as np
    logits, labels, old, adv, mask = _ppo_inputs(rng)
    plain = rlhf_kernels.ppo_actor_loss(logits, labels, old, adv, mask, entropy_coef=0.01,
                                        clip_low=0.2, ratio_clamp=20)
    other = rlhf_kernels.ppo_actor_loss(logits, labels, old, adv, mask,
                                        entropy_coef=torch.tensor(0.01), clip_low=np.float32(0.2),
                                        ratio_clamp=np.int64(20))
    torch.testing.assert_close(plain.loss, other.loss)


@pytest.mark.parametrize("option,value", [("temperature", "hot"), ("top_k", "many"),
                                          ("top_p", None)])
def test_sample_options_not_a_number(option, value):
    with pytest.raises(TypeError, match=rf"{option} must be a real number"):
        rlhf_kernels.sample(torch.randn(2, 5), **{option: value})
