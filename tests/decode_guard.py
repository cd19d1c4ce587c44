"""Out-of-range lengths given to a decode attention kernel itself (the Python op refuses them):
the caches are views into larger buffers with guard values around them, so a write outside the
cache, or a read of a guard value, shows. Used by the CUDA and Triton kernel tests."""
import torch

from rlhf_kernels.reference.decode_attention import decode_attention as ref_attention

GUARD = 1000.0  # read as a key, it would dominate the softmax: a read outside shows in out


def guarded_case(device, B=3, H=2, S=40, D=64, pad=128, seed=4):
    """Caches [B, H, S, D] inside guarded buffers; cache_seqlens [S, -1, 5] with k_new / v_new
    (row 0: no room, row 1: negative, row 2: legal) and cache_start [-3, 0, -7]."""
    gen = torch.Generator().manual_seed(seed)
    n = B * H * S * D
    bufs = [torch.full((n + 2 * pad,), GUARD) for _ in range(2)]
    for buf in bufs:
        buf[pad:-pad] = torch.randn(n, generator=gen)
    bufs = [buf.to(device) for buf in bufs]
    case = dict(q=torch.randn(B, 2 * H, D, generator=gen).to(device), bufs=bufs,
                before=[buf.clone() for buf in bufs], pad=pad, shape=(B, H, S, D),
                caches=[buf[pad:-pad].view(B, H, S, D) for buf in bufs],
                new=[torch.randn(B, H, D, generator=gen).to(device) for _ in range(2)],
                seqlens=torch.tensor([S, -1, 5], dtype=torch.int32, device=device),
                start=torch.tensor([-3, 0, -7], dtype=torch.int32, device=device))
    return case


def check_guarded(case, got, atol):
    """Nothing written outside the caches nor at an illegal position; out = attention over the
    clamped ranges: row 0 [0, S) (no append), row 1 nothing (0), row 2 [0, 6) (appended at 5)."""
    pad, (B, H, S, D) = case["pad"], case["shape"]
    for buf, old in zip(case["bufs"], case["before"]):
        assert torch.equal(buf[:pad], old[:pad]), "written before the cache"
        assert torch.equal(buf[-pad:], old[-pad:]), "written after the cache"
        inside, old_inside = (x[pad:-pad].view(B, H, S, D) for x in (buf, old))
        assert torch.equal(inside[:2], old_inside[:2]), "an out-of-range append wrote"
        assert torch.equal(inside[2, :, :5], old_inside[2, :, :5])
        assert torch.equal(inside[2, :, 6:], old_inside[2, :, 6:])
    for cache, new in zip(case["caches"], case["new"]):
        assert torch.equal(cache[2, :, 5], new[2]), "the legal append is missing"
    device = got.device
    k, v = (c.double() for c in case["caches"])
    want = ref_attention(case["q"].double(), k, v,
                         torch.tensor([S, 0, 6], dtype=torch.int32, device=device),
                         cache_start=torch.zeros(B, dtype=torch.int32, device=device),
                         softmax_scale=0.125)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)
    assert torch.equal(got[1], torch.zeros_like(got[1])), "a row with nothing visible is 0"
