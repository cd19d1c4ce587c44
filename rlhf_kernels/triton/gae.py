"""GAE as an associative scan in Triton, backwards in time.

Per token the state (A, N) = (advantage, value of the next valid token) is mapped by an affine
map A' = a*A + b*N + d, N' = e*N + f (see csrc/cpu/gae.cpp for the per-token maps of the two
modes). Such maps compose into maps of the same form, so an associative scan over a tile gives
every token's map from the tile's right edge; applying it to the carry from the tile to the right
gives (A, N) everywhere. One program walks one row, tile by tile, from the end.

Tiles are loaded back to front (lane 0 = the tile's last token) and scanned forwards: the
recursion runs backwards in time, and a forward scan of a non-commutative combine is the
well-trodden path in Triton's lowering (reverse=True has had ordering bugs).

`gae` at the end is the host side (buffers, block size, launch), with the contract of
csrc/gae.h.
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK = 1024


@triton.jit
def _compose(a_r, b_r, d_r, e_r, f_r, a_l, b_l, d_l, e_l, f_l):
    # Triton passes the accumulated part first: here the tokens to the right (later in time).
    # The result is left ∘ right: apply the right map, then the left one.
    return (a_l * a_r,
            a_l * b_r + b_l * e_r,
            a_l * d_r + b_l * f_r + d_l,
            e_l * e_r,
            e_l * f_r + f_l)


@triton.jit
def gae_scan_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, cu_ptr, stats_ptr, bad_ptr,
                    row_len, gamma, gamma_lam,
                    SKIP: tl.constexpr, PACKED: tl.constexpr, WHITEN: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0)
    if PACKED:
        start = tl.load(cu_ptr + row).to(tl.int64)
        end = tl.load(cu_ptr + row + 1).to(tl.int64)
    else:
        start = row.to(tl.int64) * row_len
        end = start + row_len
    offs = tl.arange(0, BLOCK)
    carry_a = tl.zeros((), tl.float32)
    carry_n = tl.zeros((), tl.float32)
    bad_r = tl.zeros((), tl.int32)
    bad_v = tl.zeros((), tl.int32)
    s1 = tl.zeros((), tl.float64)
    s2 = tl.zeros((), tl.float64)
    cnt = tl.zeros((), tl.float64)
    n_tiles = tl.cdiv(end - start, BLOCK)
    for i in range(n_tiles):
        # lane j holds the token j places before the tile's end; the partial tile is the last
        idx = end - 1 - i * BLOCK - offs
        inside = idx >= start
        valid = (tl.load(m_ptr + idx, mask=inside, other=0) != 0) & inside
        r = tl.load(r_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        rt = tl.where(valid, r, 0.0)
        vt = tl.where(valid, v, 0.0)
        bad_r += tl.sum(((rt - rt) != 0).to(tl.int32), 0)
        bad_v += tl.sum(((vt - vt) != 0).to(tl.int32), 0)
        if SKIP:
            active = valid
        else:
            active = inside
        a = tl.where(active, gamma_lam, 1.0)
        b = tl.where(active, gamma, 0.0)
        d = tl.where(active, rt - vt, 0.0)
        e = tl.where(active, 0.0, 1.0)
        f = tl.where(active, vt, 0.0)
        a, b, d, e, f = tl.associative_scan((a, b, d, e, f), 0, _compose)
        adv = a * carry_a + b * carry_n + d
        nxt = e * carry_n + f
        adv = tl.where(valid, adv, 0.0)
        tl.store(adv_ptr + idx, adv, mask=inside)
        tl.store(ret_ptr + idx, tl.where(valid, adv + vt, 0.0), mask=inside)
        if WHITEN:
            s1 += tl.sum(adv, 0).to(tl.float64)
            s2 += tl.sum(adv * adv, 0).to(tl.float64)
            cnt += tl.sum(valid.to(tl.float32), 0).to(tl.float64)
        # the last lane (the tile's first token, or past the row start: identity maps) holds the
        # state entering the next tile to the left
        last = offs == BLOCK - 1
        carry_a = tl.sum(tl.where(last, a * carry_a + b * carry_n + d, 0.0), 0)
        carry_n = tl.sum(tl.where(last, nxt, 0.0), 0)
    tl.store(bad_ptr + 2 * row, bad_r)
    tl.store(bad_ptr + 2 * row + 1, bad_v)
    if WHITEN:
        tl.store(stats_ptr + 3 * row, s1)
        tl.store(stats_ptr + 3 * row + 1, s2)
        tl.store(stats_ptr + 3 * row + 2, cnt)


@triton.jit
def gae_whiten_kernel(adv_ptr, m_ptr, mean_rstd_ptr, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    mean = tl.load(mean_rstd_ptr)
    rstd = tl.load(mean_rstd_ptr + 1)
    adv = tl.load(adv_ptr + idx, mask=inside, other=0.0)
    valid = tl.load(m_ptr + idx, mask=inside, other=0) != 0
    tl.store(adv_ptr + idx, tl.where(valid, (adv - mean) * rstd, 0.0), mask=inside)


def aot_variants():
    """(kernel, signature, constexprs, num_warps) of the launches `gae` makes, for the
    ahead-of-time compile check in tests/test_triton_aot.py."""
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        for skip in (False, True):
            for packed in (False, True):
                for whiten in (False, True):
                    sig = {"r_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "m_ptr": "*u8",
                           "adv_ptr": "*fp32", "ret_ptr": "*fp32",
                           "cu_ptr": "*i32", "stats_ptr": "*fp64",
                           "bad_ptr": "*i32", "row_len": "i64", "gamma": "fp32",
                           "gamma_lam": "fp32", "SKIP": "constexpr", "PACKED": "constexpr",
                           "WHITEN": "constexpr", "BLOCK": "constexpr"}
                    consts = {"SKIP": skip, "PACKED": packed, "WHITEN": whiten, "BLOCK": 1024}
                    yield gae_scan_kernel, sig, consts, 4
    yield (gae_whiten_kernel, {"adv_ptr": "*fp32", "m_ptr": "*u8", "mean_rstd_ptr": "*fp32",
                               "n": "i64", "BLOCK": "constexpr"}, {"BLOCK": 1024}, 4)


def gae(rewards, values, mask, cu_seqlens, row_len: int, gamma: float, lam: float, skip: bool,
        whiten: bool):
    """Flat [N] inputs (padded rows of row_len, or packed rows: cu_seqlens [B+1] int32) ->
    (advantages [N] f32, returns [N] f32, bad [1] int32), as gae_cpu."""
    n = rewards.numel()
    packed = cu_seqlens is not None
    if packed:
        batch = cu_seqlens.numel() - 1
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        row_len = 0
    else:
        batch, longest = n // row_len, row_len
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(max(longest, 1))))
    adv, ret = torch.empty(2, n, dtype=torch.float32, device=rewards.device)  # one allocation
    bad = torch.zeros(batch, 2, dtype=torch.int32, device=rewards.device)
    stats = torch.zeros(batch, 3, dtype=torch.float64, device=rewards.device)
    m8 = mask.view(torch.uint8)
    gae_scan_kernel[(batch,)](
        rewards, values, m8, adv, ret, cu_seqlens if packed else bad, stats, bad, row_len,
        gamma, gamma * lam, SKIP=skip, PACKED=packed, WHITEN=whiten, BLOCK=block,
        num_warps=4 if block >= 512 else 1)
    if whiten:
        _whiten(adv, m8, stats)
    flags = (bad > 0).any(0)
    return adv, ret, (flags[0].int() | 2 * flags[1].int()).reshape(1)


def _whiten(adv, m8, stats):
    total = stats.sum(0)
    count = total[2]
    mean = total[0] / count.clamp(min=1)
    var = ((total[1] - count * mean * mean) / (count - 1).clamp(min=1)).clamp(min=0)
    var = torch.where(count > 1, var, torch.zeros_like(var))
    mean_rstd = torch.stack([mean, torch.rsqrt(var + 1e-8)]).float()
    wblock = 1024
    n = adv.numel()
    gae_whiten_kernel[(triton.cdiv(n, wblock),)](adv, m8, mean_rstd, n, BLOCK=wblock)
