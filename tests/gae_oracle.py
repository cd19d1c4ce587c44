"""Float64 GAE oracle in NumPy, written independently of rlhf_kernels.reference.

mode "skip" is computed by its definition: each row's valid tokens are moved to the front (in
order), plain GAE runs on that compacted row, and the results are put back in place.
"""
import numpy as np


def _gae_zero(r, v, m, gamma, lam):
    r = np.where(m, r, 0.0)
    v = np.where(m, v, 0.0)
    batch, length = r.shape
    adv = np.zeros_like(r)
    last = np.zeros(batch)
    for t in range(length - 1, -1, -1):
        next_v = v[:, t + 1] if t + 1 < length else 0.0
        last = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * last
        adv[:, t] = last
    return np.where(m, adv, 0.0), np.where(m, adv + v, 0.0)


def gae_oracle(rewards, values, mask, gamma, lam, mode, whiten):
    r = rewards.double().numpy()
    v = values.double().numpy()
    m = mask.bool().numpy()
    if mode == "zero":
        adv, ret = _gae_zero(r, v, m, gamma, lam)
    else:
        order = np.argsort(~m, axis=1, kind="stable")  # valid positions first, in order
        take = lambda x: np.take_along_axis(x, order, axis=1)  # noqa: E731
        adv_c, ret_c = _gae_zero(take(np.where(m, r, 0.0)), take(np.where(m, v, 0.0)), take(m),
                                 gamma, lam)
        adv, ret = np.zeros_like(r), np.zeros_like(r)
        np.put_along_axis(adv, order, adv_c, axis=1)
        np.put_along_axis(ret, order, ret_c, axis=1)
    if whiten:
        valid = adv[m]
        mean = valid.mean() if valid.size else 0.0
        var = valid.var(ddof=1) if valid.size > 1 else 0.0
        adv = np.where(m, (adv - mean) / np.sqrt(var + 1e-8), 0.0)
    return adv, ret


def error_bound(rewards, values, mask, adv, gamma, lam, scan_depth=1):
    """First-order bound on the float32 rounding error of GAE, per element.

    Each step A_t = delta_t + c*A_{t+1} rounds delta (3 operations on |r| + 2|v|) and the
    update (2 operations on |A|); errors of later steps are damped by c^k, so they add up over
    K = min(T, 1/(1 - c)) steps. A parallel scan evaluates the same sums in a tree, which adds
    at most log2(T) roundings per term (scan_depth). u = 2^-24 is float32's unit roundoff.
    """
    u = 2.0 ** -24
    c = gamma * lam
    length = rewards.shape[-1]
    k = length if c >= 1 else min(length, 1.0 / (1.0 - c) + 1)
    m = mask.bool().numpy()
    inputs = np.abs(np.where(m, rewards.double().numpy(), 0)) + 2 * np.abs(
        np.where(m, values.double().numpy(), 0))
    scale = 2 * np.abs(adv).max() + 3 * inputs.max(initial=0.0)
    return (scan_depth + 1) * k * u * scale + 1e-30
