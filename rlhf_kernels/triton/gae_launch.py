"""Host side of the Triton GAE kernels: buffers, block size, launch."""
import torch
import triton

from .gae import gae_scan_kernel, gae_whiten_kernel

MAX_BLOCK = 1024


def gae(r, v, m, cu_seqlens, gamma, lam, skip, whiten):
    n = r.numel()
    packed = cu_seqlens is not None
    if packed:
        batch = cu_seqlens.numel() - 1
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        row_len = 0
    else:
        batch, row_len = r.shape
        longest = row_len
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(max(longest, 1))))
    adv = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    ret = torch.empty_like(adv)
    bad = torch.zeros(batch, 2, dtype=torch.int32, device=r.device)
    stats = torch.zeros(batch, 3, dtype=torch.float64, device=r.device)
    m8 = m.view(torch.uint8)
    gae_scan_kernel[(batch,)](
        r, v, m8, adv, ret, cu_seqlens if packed else bad, stats, bad, row_len,
        gamma, gamma * lam, SKIP=skip, PACKED=packed, WHITEN=whiten, BLOCK=block,
        num_warps=4 if block >= 512 else 1)
    if whiten:
        total = stats.sum(0)
        count = total[2]
        mean = total[0] / count.clamp(min=1)
        var = ((total[1] - count * mean * mean) / (count - 1).clamp(min=1)).clamp(min=0)
        var = torch.where(count > 1, var, torch.zeros_like(var))
        mean_rstd = torch.stack([mean, torch.rsqrt(var + 1e-8)]).float()
        wblock = 1024
        gae_whiten_kernel[(triton.cdiv(n, wblock),)](adv, m8, mean_rstd, n, BLOCK=wblock)
    flags = (bad > 0).any(0)
    return adv, ret, flags[0].int() | 2 * flags[1].int()
