"""Sampling in plain PyTorch: temperature, top-k, top-p (nucleus), greedy.

Returns the chosen tokens and their behaviour log-probs log_softmax(logits / T)[token] over
the full vocabulary: what training recomputes at the same temperature. Greedy (T = 0) returns
the argmax and log_softmax(logits)[argmax]. The kept set (contract in csrc/decode.h): the top_k
largest logits (ties at the k-th kept) and the tokens whose strictly-more-probable mass is
below top_p; the token is the inverse CDF of the kept distribution at u, in index order.

Non-finite logits: the one rule every backend (cpu, cuda, triton, torch) follows. It applies to
z = logits / temperature (the logits themselves when greedy), so a huge finite logit that a
small temperature overflows counts as +inf.
  - NaN anywhere in a row: the row has no distribution. Error row NAN_ROW (the model produced
    NaN logits): sampling it would only turn garbage into a plausible-looking token.
  - +inf: the +inf tokens share the probability mass uniformly and every other token gets 0
    (the limit of softmax as those logits grow): the row is sampled as if z were 0 at the +inf
    tokens and -inf elsewhere. top_k / top_p keep all of them (they tie at the top), greedy
    picks the first, and the log-prob is -log(number of +inf tokens).
  - -inf: probability 0 (a masked token). A row that is -inf everywhere has no token to give:
    error row EMPTY_ROW.
The sampling kernels never raise (that would cost a host sync per decode step, and a CUDA graph
cannot hold one): an error row gets token NAN_ROW / EMPTY_ROW (< 0) and log-prob NaN. The
callers check on the host: rlhf_kernels.sample after each call, generate() at the checks its
loop already syncs for, and at the end; both raise ValueError naming the rows (row_errors).
"""
import torch

NAN_ROW = -1    # token of a row holding NaN
EMPTY_ROW = -2  # token of a row that is -inf everywhere


class NonFiniteLogitsError(ValueError):
    """Logits that break the sampling rule (a row with NaN, or -inf everywhere): the model
    produced them, so the message names the rows and where to look."""
_WHY = {NAN_ROW: "hold NaN: the model produced NaN logits (look for NaN or inf in its weights, "
                 "inputs or activations)",
        EMPTY_ROW: "are -inf everywhere (after the division by the temperature): no token has a "
                   "nonzero probability"}


def draw_uniforms(n: int, generator, device) -> torch.Tensor:
    """n draws in [0, 1) on `device`. They are drawn on the generator's own device, then moved:
    a CPU generator (the common `torch.Generator().manual_seed(0)`) works for a CUDA model,
    and the same seed gives the same draws on every device."""
    where = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=where).to(device)


def divide_by_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z = logits / temperature as an IEEE float32 division by float32(temperature), on every
    device: the contract's z (csrc/decode.h), which every sampling kernel computes. Dividing by
    a Python number would not do on CUDA: torch turns a division by a CPU scalar into a multiply
    by its float reciprocal there (ATen's div_true_kernel_cuda), which can differ by one ulp and
    so move a tie at the top-k / top-p boundary. A 1-element tensor on the logits' own device is
    divided truly (torch.full: a fill, no host-to-device copy)."""
    t = torch.full((1,), temperature, dtype=torch.float32, device=logits.device)
    return logits.float() / t


def apply_nonfinite_rule(z: torch.Tensor):
    """(z with the rule applied, codes [B] int64: 0, NAN_ROW or EMPTY_ROW). The error rows'
    z become 0 everywhere, so that what runs after them stays defined (their results are
    replaced by the codes)."""
    inf = float("inf")
    nan = torch.isnan(z).any(-1)
    top = z == inf
    z = torch.where(top.any(-1, keepdim=True), torch.where(top, 0.0, -inf), z)
    empty = (z == -inf).all(-1)
    codes = torch.where(nan, NAN_ROW, torch.where(empty, EMPTY_ROW, 0))
    return torch.where((codes != 0)[:, None], 0.0, z), codes


def _mark_errors(tokens, logp, codes):
    bad = codes != 0
    return torch.where(bad, codes, tokens), torch.where(bad, float("nan"), logp)


def row_errors(tokens: torch.Tensor, what: str = "logits row(s)") -> str | None:
    """The error message for the error rows among sampled `tokens` [B] (None when there is
    none). A host sync: callers do it once per call / check, never inside a kernel."""
    host = tokens.detach().cpu()
    parts = []
    for code, why in _WHY.items():
        rows = (host == code).nonzero().flatten().tolist()
        if rows:
            parts.append(f"{what} {rows} {why}")
    return "; ".join(parts) or None


def kept_mask(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[B, V] bool: the tokens top-k / top-p keep (the most probable always stays)."""
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        keep &= z >= kth
    if top_p < 1.0:
        probs = torch.softmax(z, dim=-1)
        ascending, _ = torch.sort(probs, dim=-1)
        suffix = ascending.flip(-1).cumsum(-1).flip(-1)  # suffix[i] = mass of ascending[i:]
        # mass strictly above p_i = suffix at the first ascending index holding a value > p_i
        first_greater = torch.searchsorted(ascending, probs, right=True)
        padded = torch.cat([suffix, torch.zeros_like(suffix[..., :1])], dim=-1)
        keep &= padded.gather(-1, first_greater) < top_p
    return keep


def greedy(logits: torch.Tensor):
    """logits [B, V] -> (argmax tokens [B] int64, log_softmax(logits)[token] [B] float32),
    error rows marked (the rule above)."""
    z, codes = apply_nonfinite_rule(logits.float())
    tokens = z.argmax(-1)
    return _mark_errors(tokens, torch.log_softmax(z, -1).gather(-1, tokens[:, None])[:, 0],
                        codes)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator=None, uniforms=None):
    """logits [B, V] -> (tokens [B] int64, logprobs [B] float32). uniforms [B] in [0, 1), if
    given, replace the draws from `generator`. Error rows (the rule above) get a token < 0."""
    if temperature == 0:
        return greedy(logits)
    z, codes = apply_nonfinite_rule(divide_by_temperature(logits, temperature))
    logp_full = torch.log_softmax(z, -1)
    probs = torch.where(kept_mask(z, top_k, top_p), logp_full.exp(), 0.0)
    if uniforms is None:
        uniforms = draw_uniforms(z.shape[0], generator, z.device)
    cdf = probs.cumsum(-1)
    target = uniforms[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # past the end through rounding at the top of the cdf: the last kept token
    index = torch.arange(z.shape[-1], device=z.device)
    last_kept = torch.where(probs > 0, index, -1).max(-1).values
    tokens = torch.where(tokens < z.shape[-1], tokens, last_kept)
    return _mark_errors(tokens, logp_full.gather(-1, tokens[:, None]).squeeze(-1), codes)
