"""Temperature / top-k / top-p sampling in Triton, one program per row, no sort, no host sync.

Same contract as csrc/decode.h. With z = logits / temperature in float32 and p = softmax(z) over
the full vocabulary, the kept set is {z >= k-th largest z} ∩ {mass of tokens with larger z <
top_p}; both are of the form key(z) >= threshold, where key maps a float32 to an int32 with the
same order (the sign-magnitude bits turned into two's complement; -0.0 is taken as +0.0). So
each threshold is found exactly by a 32-step bisection over the int32 keys, each step one pass
over the row (the row stays in L2 across passes):
  top-k: the largest t with count(key >= t) >= k is exactly the k-th largest key (ties kept);
  top-p: the smallest t with mass(key > t) < top_p. mass(key > key_i) is the mass strictly
         more probable than token i (softmax is monotone), and it only grows as t falls
         (adding nonnegative terms never lowers a rounded sum), so key_i >= t <=> kept.
Passes: one online log-sum-exp, 32 per active filter, the kept mass W, then the inverse-CDF
walk in index order with a running cumulative sum: the token is the first kept index whose
cumulative kept mass exceeds u * W. If rounding leaves the walk short of u * W, the last kept
index is returned, so the token is always in the kept set. logprob = z[token] - lse.

z is a true float32 division by float32(temperature), as torch's logits.float() / temperature.

Non-finite z follow the rule of rlhf_kernels/reference/sample.py. The log-sum-exp pass also
counts NaN and +inf: a row holding +inf is read as 0 at its +inf tokens and -inf elsewhere by
every later pass (lse = log(count)); an error row (NaN, or -inf everywhere) is read as all 0, so
that the later passes stay defined, and gets token -1 (NaN) / -2 (-inf everywhere), log-prob NaN.
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096  # chunk of the vocabulary per pass step (tests lower it to get many chunks)
INT32_MIN, INT32_MAX = tl.constexpr(-(2 ** 31)), tl.constexpr(2 ** 31 - 1)


@triton.jit
def _keys(z):
    bits = z.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(z == 0.0, 0, key)


@triton.jit
def _load_raw(base, idx, V, temperature):
    # div_rn: IEEE division as torch does it; `/` compiles to the approximate div.full.f32
    x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
    return tl.math.div_rn(x, temperature)


@triton.jit
def _load_z(base, idx, V, temperature, inf_row, bad_row):
    """z under the non-finite rule; padding lanes (idx >= V) stay -inf."""
    z = _load_raw(base, idx, V, temperature)
    z = tl.where(inf_row, tl.where(z == float("inf"), 0.0, float("-inf")), z)
    return tl.where(bad_row & (idx < V), 0.0, z)


@triton.jit
def sample_kernel(logits_ptr, uniforms_ptr, tokens_ptr, logp_ptr, V, stride_b, temperature,
                  top_k, top_p, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_b
    offs = tl.arange(0, BLOCK_V)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    n_nan = tl.zeros((), tl.int32)
    n_inf = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK_V):
        z = _load_raw(base, start + offs, V, temperature)
        n_nan += tl.sum((z != z).to(tl.int32), 0)
        n_inf += tl.sum((z == float("inf")).to(tl.int32), 0)
        # the log-sum-exp of the finite z; NaN / +inf rows take theirs below
        z = tl.where((z != z) | (z == float("inf")), float("-inf"), z)
        m_new = tl.maximum(m, tl.max(z, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # -inf - -inf would be NaN
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), 0)
        m = m_new
    inf_row = (n_nan == 0) & (n_inf > 0)
    nan_row = n_nan > 0
    empty_row = (n_nan == 0) & (n_inf == 0) & (m == float("-inf"))
    bad_row = nan_row | empty_row
    # +inf row: each +inf token has mass 1 / count; error row: read as all 0 (uniform). The
    # logs' arguments are kept >= 1 where their branch is not taken (no log(0) evaluated)
    lse = tl.where(inf_row, tl.log(tl.maximum(n_inf, 1).to(tl.float32)),
                   tl.where(bad_row, tl.log(tl.zeros((), tl.float32) + V),
                            m + tl.log(tl.where(s > 0.0, s, 1.0))))

    thresh = tl.full((), INT32_MIN, tl.int64)
    if HAS_TOPK:
        lo = tl.full((), INT32_MIN, tl.int64)  # invariant: count(key >= lo) >= top_k
        hi = tl.full((), INT32_MAX, tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            cnt = tl.zeros((), tl.int32)
            for start in range(0, V, BLOCK_V):
                idx = start + offs
                key = _keys(_load_z(base, idx, V, temperature, inf_row, bad_row))
                cnt += tl.sum(((key >= mid.to(tl.int32)) & (idx < V)).to(tl.int32), 0)
            ok = cnt >= top_k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        thresh = lo
    if HAS_TOPP:
        lo = tl.full((), INT32_MIN, tl.int64)
        hi = tl.full((), INT32_MAX, tl.int64)  # invariant: mass(key > hi) < top_p
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            mass = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK_V):
                z = _load_z(base, start + offs, V, temperature, inf_row, bad_row)
                p = tl.exp(z - lse)  # 0 on padding lanes (z = -inf)
                mass += tl.sum(tl.where(_keys(z) > mid.to(tl.int32), p, 0.0), 0)
            ok = mass < top_p
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid + 1)
        thresh = tl.maximum(thresh, hi)
    t32 = thresh.to(tl.int32)

    total = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        z = _load_z(base, idx, V, temperature, inf_row, bad_row)
        total += tl.sum(tl.where((_keys(z) >= t32) & (idx < V), tl.exp(z - lse), 0.0), 0)
    target = tl.load(uniforms_ptr + row) * total

    running = tl.zeros((), tl.float32)
    token = tl.zeros((), tl.int32) + V  # first crossing so far (V: none yet)
    last = tl.full((), -1, tl.int32)  # last kept index so far
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        z = _load_z(base, idx, V, temperature, inf_row, bad_row)
        kept = (_keys(z) >= t32) & (idx < V)
        p = tl.where(kept, tl.exp(z - lse), 0.0)
        cum = running + tl.cumsum(p, 0)
        # only kept tokens with p > 0 can be the crossing, whatever the scan's rounding does
        hit = (cum > target) & (p > 0.0)
        token = tl.minimum(token, tl.min(tl.where(hit, idx, V), 0))
        # a kept token of probability 0 (underflow, or not +inf in a +inf row) is never returned
        last = tl.maximum(last, tl.max(tl.where(kept & (p > 0.0), idx, -1), 0))
        running += tl.sum(p, 0)
    token = tl.maximum(tl.where(token < V, token, last), 0)  # >= 0: the load below stays in
    z_tok = _load_z(base, token, V, temperature, inf_row, bad_row)
    code = tl.where(nan_row, -1, -2)
    tl.store(tokens_ptr + row, tl.where(bad_row, code, token).to(tl.int64))
    tl.store(logp_ptr + row, tl.where(bad_row, float("nan"), z_tok - lse))


def _launch_config(V):
    block = min(max(triton.next_power_of_2(V), 16), MAX_BLOCK_V)
    num_warps = 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1
    return block, num_warps


def sample(logits, temperature: float, top_k: int, top_p: float, uniforms):
    """logits [B, V] -> (tokens [B] int64, logprobs [B] float32); temperature > 0."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [B, V] with V > 0, got {tuple(logits.shape)}")
    if not temperature > 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError("need temperature > 0, top_k >= 0 and top_p in (0, 1]")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    uniforms = uniforms.to(device=logits.device, dtype=torch.float32).contiguous()
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logp = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return tokens, logp
    block, num_warps = _launch_config(V)
    has_topk = 0 < top_k < V
    sample_kernel[(B,)](logits, uniforms, tokens, logp, V, logits.stride(0), float(temperature),
                        int(top_k), float(top_p), HAS_TOPK=has_topk, HAS_TOPP=top_p < 1.0,
                        BLOCK_V=block, num_warps=num_warps)
    return tokens, logp


def aot_variants():
    """(kernel, signature, constexprs, num_warps) for tests/test_triton_aot.py: every dtype and
    filter combination at the smallest, a middle and the largest BLOCK_V."""
    for dtype in ("fp32", "bf16", "fp16"):
        sig = {"logits_ptr": f"*{dtype}", "uniforms_ptr": "*fp32", "tokens_ptr": "*i64",
               "logp_ptr": "*fp32", "V": "i32", "stride_b": "i64", "temperature": "fp32",
               "top_k": "i32", "top_p": "fp32", "HAS_TOPK": "constexpr",
               "HAS_TOPP": "constexpr", "BLOCK_V": "constexpr"}
        for block, warps in ((16, 1), (1024, 4), (MAX_BLOCK_V, 8)):
            for topk in (False, True):
                for topp in (False, True):
                    consts = {"HAS_TOPK": topk, "HAS_TOPP": topp, "BLOCK_V": block}
                    yield sample_kernel, sig, consts, warps
