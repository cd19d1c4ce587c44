"""rlhf_kernels.ops.tied_embedding: a tied input embedding's gradient added into our fused LM
head's in place (no second [V, H] tensor), only in a backward pass where that head handed
autograd a dense gradient for the same weight; torch's dense backward everywhere else."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_kernels import fused_linear_logprobs
from rlhf_kernels.integrations.transformers import (apply_rlhf_training_kernels,
                                                    remove_rlhf_training_kernels)
from rlhf_kernels.ops import tied_embedding

from tiny_models import CONFIGS, build

# fp32 sums of the same terms in another order (the embedding rows added into the head's
# gradient one by one instead of into zeros first): ~1e-7 relative; a missing or doubled
# contribution is O(1)
GRAD_RTOL = 2e-5


class Ops(TorchDispatchMode):
    """The names of the ATen ops that ran."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def assert_grads_close(got, want):
    for name, g in want.items():
        assert got[name].layout == torch.strided, name
        scale = g.abs().max().clamp_min(1e-30)
        assert ((got[name] - g).abs().max() / scale).item() < GRAD_RTOL, name


def fused_head_loss(model, ids, labels):
    hidden = model.model(input_ids=ids).last_hidden_state
    return fused_linear_logprobs(hidden, model.lm_head.weight, labels).sum()


def logits_loss(model, ids, labels):
    logits = model(input_ids=ids).logits
    return torch.log_softmax(logits, -1).gather(-1, labels[..., None]).sum()


def grads_and_ops(model, loss_fn, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, ids, labels)
    with Ops() as ops:
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, ops.names


@pytest.fixture
def tied_pair():
    model = build(CONFIGS["llama-gqa-tied"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rng = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (3, 7), generator=rng)
    ids[0, 2] = ids[0, 5] = ids[2, 1]  # a repeated id: its rows add up
    labels = torch.randint(3, model.config.vocab_size, (3, 7), generator=rng)
    return model, apply_rlhf_training_kernels(copy.deepcopy(model)), ids, labels


def test_fused_head_and_tied_embedding_share_one_dense_gradient(tied_pair):
    plain, patched, ids, labels = tied_pair
    assert "forward" in patched.model.embed_tokens.__dict__
    want, plain_ops = grads_and_ops(plain, fused_head_loss, ids, labels)
    got, ops = grads_and_ops(patched, fused_head_loss, ids, labels)
    assert "embedding_dense_backward" in plain_ops
    assert "embedding_dense_backward" not in ops  # the rows went into the head's gradient
    assert_grads_close(got, want)


def test_without_a_fused_head_the_backward_is_torchs(tied_pair):
    plain, patched, ids, labels = tied_pair
    want, _ = grads_and_ops(plain, logits_loss, ids, labels)
    got, ops = grads_and_ops(patched, logits_loss, ids, labels)
    assert "embedding_dense_backward" in ops
    assert_grads_close(got, want)


def test_a_backward_pass_without_the_head_gets_a_dense_gradient(tied_pair):
    """One forward, two losses, two backward passes: the head ran in the first pass only, so
    the second pass's embedding gradient must be dense (a sparse one would become the
    weight's .grad after zero_grad)."""
    _, patched, ids, labels = tied_pair
    hidden = patched.model(input_ids=ids).last_hidden_state
    fused_linear_logprobs(hidden, patched.lm_head.weight, labels).sum().backward(
        retain_graph=True)
    patched.zero_grad(set_to_none=True)
    mix = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3))
    (hidden * mix).sum().backward()
    weight = patched.model.embed_tokens.weight
    assert weight.grad.layout == torch.strided
    expected = torch.zeros_like(weight).index_add_(0, ids.flatten(),
                                                   _embedding_rows_grad(patched, ids, mix))
    assert_grads_close({"w": weight.grad}, {"w": expected})


def _embedding_rows_grad(model, ids, mix):
    """d(sum of last_hidden_state * mix) / d(embedding output), row per token (plain torch)."""
    plain = remove_rlhf_training_kernels(copy.deepcopy(model))
    embeds = plain.model.embed_tokens(ids).detach().requires_grad_()
    (plain.model(inputs_embeds=embeds).last_hidden_state * mix).sum().backward()
    return embeds.grad.reshape(-1, embeds.shape[-1])


@pytest.mark.parametrize("padding_idx", [None, 4])
def test_op_against_torch_with_padding_idx(padding_idx):
    rng = torch.Generator().manual_seed(2)
    weight = torch.randn(37, 16, generator=rng)
    ids = torch.tensor([[4, 1, 4, 9, 36], [0, 4, 9, 9, 2]])
    labels = torch.randint(0, 37, ids.shape, generator=rng)
    mix = torch.randn(16, 16, generator=rng)

    def grad(embed):
        w = weight.clone().requires_grad_()
        hidden = torch.tanh(embed(ids, w, padding_idx) @ mix)
        with Ops() as ops:
            fused_linear_logprobs(hidden, w, labels).sum().backward()
        return w.grad, ops.names

    want, plain_ops = grad(F.embedding)
    got, ops = grad(tied_embedding.embedding)
    assert "embedding_dense_backward" in plain_ops and "embedding_dense_backward" not in ops
    assert got.layout == torch.strided
    torch.testing.assert_close(got, want, rtol=GRAD_RTOL, atol=1e-6)
    if padding_idx is not None:  # the pad row gets the head's gradient only
        w = weight.clone().requires_grad_()
        hidden = torch.tanh(F.embedding(ids, w.detach(), padding_idx) @ mix)
        fused_linear_logprobs(hidden, w, labels).sum().backward()
        torch.testing.assert_close(got[padding_idx], w.grad[padding_idx], rtol=GRAD_RTOL,
                                   atol=1e-6)


def test_untied_and_removed_embeddings_keep_torchs_forward():
    untied = apply_rlhf_training_kernels(build(CONFIGS["qwen3-qk-norm"]))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert "forward" not in untied.model.embed_tokens.__dict__
    tied = apply_rlhf_training_kernels(build(CONFIGS["qwen2-bias"]))
    assert "forward" in tied.model.embed_tokens.__dict__
    remove_rlhf_training_kernels(tied)
    assert "forward" not in tied.model.embed_tokens.__dict__


def _op_case(build_loss, embed):
    """d loss / d weight with `embed` as the embedding, on a small fixed problem."""
    rng = torch.Generator().manual_seed(4)
    weight = torch.randn(29, 8, generator=rng).requires_grad_()
    ids = torch.tensor([[3, 7, 3, 28], [1, 2, 7, 7]])
    labels = torch.randint(0, 29, ids.shape, generator=rng)
    build_loss(embed, weight, ids, labels).backward()
    return weight.grad


@pytest.mark.parametrize("case", ["embedding beside the head", "head on an older forward",
                                  "two heads"])
def test_graphs_where_the_head_does_not_feed_from_the_embedding(case):
    """The head hands its gradient over only to an embedding that runs later in the same
    backward pass; every other graph gets both gradients as torch computes them."""
    def build_loss(embed, weight, ids, labels):
        hidden = torch.tanh(embed(ids, weight))
        if case == "embedding beside the head":  # the head's input does not depend on it
            return fused_linear_logprobs(hidden.detach() * 2, weight, labels).sum() \
                + hidden.sum()
        if case == "head on an older forward":  # the latest embedding is not in the graph
            embed(ids.flip(0), weight)
            return fused_linear_logprobs(hidden, weight, labels).sum()
        return (fused_linear_logprobs(hidden, weight, labels).sum()
                + fused_linear_logprobs(hidden[:, 1:] * 3, weight, labels[:, 1:]).sum())

    want = _op_case(build_loss, F.embedding)
    got = _op_case(build_loss, tied_embedding.embedding)
    assert got.layout == torch.strided
    torch.testing.assert_close(got, want, rtol=GRAD_RTOL, atol=1e-6)
