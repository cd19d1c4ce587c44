"""Decode attention (one new query token per sequence) in Triton: flash-decoding, split KV.

Same contract as csrc/decode.h. q [B, Hq, D]; k_cache, v_cache [B, Hkv, S, D] contiguous; query
head h reads KV head h // (Hq // Hkv); positions [cache_start[b], end_b) are visible, with
end_b = cache_seqlens[b] (+ 1 when k_new / v_new are given: they are written at cache_seqlens[b]).

Three launches on one stream, so each sees the previous one's writes:
  1. kv_append_kernel, grid (B, Hkv), only with k_new / v_new: copies the new token into the
     caches. A separate launch (instead of having the split that covers the position write it)
     means no program can read the position before it is written, with no intra-CTA barrier.
  2. decode_split_kernel, grid (B, Hkv, num_splits): one program per KV head and split takes all
     GROUP query heads sharing that head as the rows of one tl.dot (padded to 16 rows, the
     smallest dot), so each K / V tile is read once per group rather than once per query head.
     The visible range of each sequence is cut into num_splits equal pieces (so short rows in a
     batch of long caches still spread over all splits); each piece is streamed in BLOCK_S
     tiles with an online softmax in base 2 and leaves (out / l, lse) in float32 scratch.
  3. decode_combine_kernel, grid (B * Hq,): merges the splits' partials by their lse. With one
     split (short caches, or enough B * Hkv to fill the GPU) step 2 writes the output directly.
num_splits aims at ~2 programs per SM, with at least SPLIT_MIN_LEN cache positions per split.
Out-of-range lengths / starts (refused by rlhf_kernels.decode_attention) are clamped to the cache
in the kernels, as in the CUDA one: an append outside it writes nothing, reads stay inside.

Scores are accumulated in float32; on a GPU the 16-bit tiles go to the tensor cores as they are
(products of 16-bit values are exact in float32) and the probabilities are rounded to the V dtype
for the P @ V dot, as flash attention does. Under TRITON_INTERPRET=1 every dot operand is
upcast to float32 first, since the interpreter mishandles 16-bit dots. float32 caches use IEEE
float32 dots (not TF32). A sequence with no visible position gets l = 0 and outputs 0.
"""
import torch
import triton
import triton.language as tl

from rlhf_kernels._backends import triton_interpret

SPLIT_MIN_LEN = 256  # cache positions per split at least (tests lower it to get many splits)
TARGET_PROGRAMS = 264  # ~2 per SM on an H100 (132 SMs)
MAX_SPLITS = 64
LOG2E = 1.4426950408889634


@triton.jit
def kv_append_kernel(k_new_ptr, v_new_ptr, k_ptr, v_ptr, seqlens_ptr, H, S, D,
                     BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(seqlens_ptr + b).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    src = (b * H + h) * D + d
    dst = ((b * H + h) * S + pos) * D + d
    # a position outside the cache (the Python caller refuses it) writes nothing
    ok = (d < D) & (pos >= 0) & (pos < S)
    tl.store(k_ptr + dst, tl.load(k_new_ptr + src, mask=ok), mask=ok)
    tl.store(v_ptr + dst, tl.load(v_new_ptr + src, mask=ok), mask=ok)


@triton.jit
def decode_split_kernel(q_ptr, k_ptr, v_ptr, seqlens_ptr, start_ptr, out_ptr, part_o_ptr,
                        part_lse_ptr, Hkv, S, D, GROUP, num_splits, qk_scale,
                        HAS_NEW: tl.constexpr, HAS_START: tl.constexpr, SINGLE: tl.constexpr,
                        UPCAST: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    end = tl.load(seqlens_ptr + b)
    if HAS_NEW:
        end += 1
    end = tl.minimum(end, S)  # clamped to the cache, as the CUDA kernel does: memory safety
    begin = 0
    if HAS_START:
        begin = tl.maximum(tl.load(start_ptr + b), 0)
    chunk = tl.cdiv(tl.maximum(end - begin, 0), num_splits)
    lo = begin + split * chunk
    hi = tl.minimum(lo + chunk, end)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    s_off = tl.arange(0, BLOCK_S)
    heads = hk * GROUP + g  # query heads of this KV head; rows >= GROUP are padding
    row_ok = g < GROUP
    d_ok = d < D
    q_rows = (b * Hkv * GROUP + heads) * D
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kv_base = (b * Hkv + hk) * S * D

    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        s = s0 + s_off
        s_ok = s < hi
        kt = tl.load(k_ptr + kv_base + s[None, :] * D + d[:, None],
                     mask=s_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_S]
        v = tl.load(v_ptr + kv_base + s[:, None] * D + d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, kt, input_precision="ieee") * qk_scale  # log2 units
        qk = tl.where(s_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        # rows that have seen only -inf so far shift by 0: -inf - -inf would be NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - shift)
        p = tl.exp2(qk - shift[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new

    o = acc / tl.where(l > 0, l, 1.0)[:, None]  # l == 0: nothing visible, acc is 0
    if SINGLE:
        dst = out_ptr + q_rows[:, None] + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = (b * Hkv * GROUP + heads) * num_splits + split
        tl.store(part_o_ptr + part[:, None] * D + d[None, :], o,
                 mask=row_ok[:, None] & d_ok[None, :])
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def decode_combine_kernel(part_o_ptr, part_lse_ptr, out_ptr, D, num_splits,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * Hq + h
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    n_ok = n < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + n, mask=n_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # all 0 when nothing visible
    o = tl.load(part_o_ptr + (row * num_splits + n)[:, None] * D + d[None, :],
                mask=n_ok[:, None] & (d < D)[None, :], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + d, res.to(out_ptr.dtype.element_ty), mask=d < D)


def _num_splits(B, Hkv, S):
    by_len = triton.cdiv(S, SPLIT_MIN_LEN)
    by_grid = triton.cdiv(TARGET_PROGRAMS, B * Hkv)
    return max(1, min(by_len, by_grid, MAX_SPLITS))


def _blocks(group, D):
    block_d = max(triton.next_power_of_2(D), 16)
    block_s = 64 if block_d <= 128 else 32
    return max(triton.next_power_of_2(group), 16), block_s, block_d


def decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, cache_start,
                     softmax_scale: float):
    """-> out [B, Hq, D] in q's dtype; writes k_new / v_new (if given) into the caches."""
    B, Hq, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    if Hq % Hkv or k_cache.shape != v_cache.shape or k_cache.shape[::3] != (B, D):
        raise ValueError("q must be [B, Hq, D] and the caches [B, Hkv, S, D] with Hkv | Hq")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (they are written in place)")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new go together")
    q = q.contiguous()
    seqlens = cache_seqlens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    group = Hq // Hkv
    block_g, block_s, block_d = _blocks(group, D)
    has_new = k_new is not None
    if has_new:
        kv_append_kernel[(B, Hkv)](k_new.to(k_cache.dtype).contiguous(),
                                   v_new.to(v_cache.dtype).contiguous(), k_cache, v_cache,
                                   seqlens, Hkv, S, D, BLOCK_D=block_d, num_warps=1)
    start = seqlens if cache_start is None else cache_start.to(torch.int32).contiguous()
    splits = _num_splits(B, Hkv, S)
    single = splits == 1
    part_o = torch.empty((B, Hq, splits, D) if not single else (1,), dtype=torch.float32,
                         device=q.device)
    part_lse = torch.empty((B, Hq, splits) if not single else (1,), dtype=torch.float32,
                           device=q.device)
    decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, seqlens, start, out, part_o, part_lse, Hkv, S, D, group, splits,
        float(softmax_scale) * LOG2E, HAS_NEW=has_new, HAS_START=cache_start is not None,
        SINGLE=single, UPCAST=triton_interpret() or q.dtype == torch.float32,
        BLOCK_G=block_g, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)
    if not single:
        decode_combine_kernel[(B * Hq,)](part_o, part_lse, out, D, splits,
                                         BLOCK_N=max(triton.next_power_of_2(splits), 2),
                                         BLOCK_D=block_d, num_warps=2)
    return out


def aot_variants():
    """(kernel, signature, constexprs, num_warps) of the launches above, for the ahead-of-time
    compile check in tests/test_triton_aot.py: every dtype, the smallest and largest D block, the
    flags, one and many splits. UPCAST is what the GPU path uses (True only for float32)."""
    for dtype in ("fp32", "bf16", "fp16"):
        for block_d in (16, 128, 256):
            sig = {"k_new_ptr": f"*{dtype}", "v_new_ptr": f"*{dtype}", "k_ptr": f"*{dtype}",
                   "v_ptr": f"*{dtype}", "seqlens_ptr": "*i32", "H": "i32", "S": "i32",
                   "D": "i32", "BLOCK_D": "constexpr"}
            yield kv_append_kernel, sig, {"BLOCK_D": block_d}, 1
            sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}",
                   "seqlens_ptr": "*i32", "start_ptr": "*i32", "out_ptr": f"*{dtype}",
                   "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "Hkv": "i32", "S": "i32",
                   "D": "i32", "GROUP": "i32", "num_splits": "i32", "qk_scale": "fp32",
                   "HAS_NEW": "constexpr", "HAS_START": "constexpr", "SINGLE": "constexpr",
                   "UPCAST": "constexpr", "BLOCK_G": "constexpr", "BLOCK_S": "constexpr",
                   "BLOCK_D": "constexpr"}
            block_s = _blocks(1, block_d)[1]
            for block_g in (16, 32):
                for flag in (False, True):
                    consts = {"HAS_NEW": flag, "HAS_START": flag, "SINGLE": flag,
                              "UPCAST": dtype == "fp32", "BLOCK_G": block_g,
                              "BLOCK_S": block_s, "BLOCK_D": block_d}
                    yield decode_split_kernel, sig, consts, 4
            sig = {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": f"*{dtype}",
                   "D": "i32", "num_splits": "i32", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
            for block_n in (2, MAX_SPLITS):
                yield decode_combine_kernel, sig, {"BLOCK_N": block_n, "BLOCK_D": block_d}, 2
