"""torch.compile(fullgraph=True) over the training-side ops: no graph break (the kernels are
custom ops, the host-sync checks run inside them), and the eager results. Few and small:
inductor compiles slowly on a small CPU."""
import pytest
import torch

import rlhf_kernels
from rlhf_kernels import _backends

pytestmark = pytest.mark.skipif(not _backends.kernel_status("logprobs", "cpu")[0],
                                reason="needs the C++ extension (pip install -e .)")


def _batch(rng, batch=2, length=5, vocab=11, hidden=6):
    x = torch.randn(batch, length, hidden, generator=rng)
    weight = torch.randn(vocab, hidden, generator=rng) * 0.5
    labels = torch.randint(0, vocab, (batch, length), generator=rng)
    old = -torch.rand(batch, length, generator=rng) * 3
    adv = torch.randn(batch, length, generator=rng)
    mask = torch.rand(batch, length, generator=rng) > 0.2
    return x, weight, labels, old, adv, mask


def _training_step(x, weight, labels, old, adv, mask, rewards, values):
    """One function calling each op: compiled as one graph or not at all (fullgraph)."""
    logits = x @ weight.t()
    out = rlhf_kernels.ppo_actor_loss(logits, labels, old, adv, mask, entropy_coef=0.01,
                                      backend="cpu")
    fused = rlhf_kernels.fused_linear_ppo_actor_loss(x, weight, labels, old, adv, mask,
                                                     chunk_size=4, backend="cpu")
    logp = rlhf_kernels.logprobs(logits, labels, backend="cpu")
    advantages, returns = rlhf_kernels.gae(rewards, values, mask, gamma=0.99, backend="cpu")
    return out.loss + fused.loss, out.clipfrac, fused.approx_kl, logp, advantages, returns


def _run(fn, inputs):
    x, weight = (t.clone().requires_grad_() for t in inputs[:2])
    results = fn(x, weight, *inputs[2:])
    results[0].backward()
    return [r.detach() for r in results] + [x.grad, weight.grad]


def test_compiled_training_ops_match_eager(rng):
    x, weight, labels, old, adv, mask = _batch(rng)
    rewards, values = torch.randn(2, 2, 5, generator=rng)
    inputs = (x, weight, labels, old, adv, mask, rewards, values)
    torch._dynamo.reset()
    compiled = torch.compile(_training_step, fullgraph=True)  # a graph break raises here
    got = _run(compiled, inputs)
    want = _run(_training_step, inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_compiled_ops_keep_their_value_checks(rng):
    """The checks that read data (label range, non-finite GAE inputs) run inside the ops, so a
    compiled graph keeps them."""
    x, weight, labels, old, adv, mask = _batch(rng)
    torch._dynamo.reset()
    logprobs = torch.compile(lambda z, y: rlhf_kernels.logprobs(z, y, backend="cpu"),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\)"):
        logprobs(x @ weight.t(), labels + 11)
    gae = torch.compile(lambda r, v: rlhf_kernels.gae(r, v, backend="cpu"), fullgraph=True,
                        backend="aot_eager")
    with pytest.raises(ValueError, match="rewards holds a non-finite value"):
        gae(torch.tensor([[1.0, float("nan")]]), torch.zeros(1, 2))
