"""Forward passes and experience on tiny random models: Llama (rotary positions) and GPT-2
(learned absolute positions, where left padding would show). The models and rollouts here are
also used by test_algorithms_training.py."""
import copy
import types

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf.algorithms import (Experience, RLHParams, TorchEngine, get_algorithm,
                             make_experience, response_logprobs, response_values)

VOCAB = 37


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                      n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).eval()


class TinyCritic(torch.nn.Module):
    """critic(input_ids, attention_mask) -> [B, T] values, depending on the token and the
    count of real tokens so far."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(9, 1)

    def forward(self, input_ids, attention_mask):
        count = attention_mask.float().cumsum(-1).unsqueeze(-1) / 10
        return self.head(torch.cat([self.embed(input_ids), count], -1)).squeeze(-1)


class FullLogitsOnly(torch.nn.Module):
    """A model whose forward takes only input_ids and attention_mask (no position_ids, no
    logits_to_keep): the full logits come back."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def rollout(gen, batch=4, prompt_len=5, n=6, pad=0):
    """Left padded prompts + responses; row 1 stops early, row 2 has a 1-token response."""
    seq = torch.randint(1, VOCAB, (batch, prompt_len + n), generator=gen)
    prompt_mask = torch.ones(batch, prompt_len, dtype=torch.long)
    prompt_mask[0, :2] = 0
    response_mask = torch.ones(batch, n, dtype=torch.long)
    response_mask[1, 3:] = 0
    response_mask[2, 1:] = 0
    seq[:, :prompt_len][prompt_mask == 0] = pad
    seq[:, prompt_len:][response_mask == 0] = pad
    return types.SimpleNamespace(sequences=seq, response_mask=response_mask,
                                 logprobs=-torch.rand(batch, n, generator=gen)), prompt_mask


def full_mask(generation, prompt_mask):
    return torch.cat([prompt_mask, generation.response_mask], 1)


# ---------------------------------------------------------------------------- forward passes

@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_float64_forward(make_model, temperature):
    model = make_model()
    g, prompt_mask = rollout(torch.Generator().manual_seed(0))
    mask, P = full_mask(g, prompt_mask), prompt_mask.shape[1]
    logp, entropy = response_logprobs(model, g.sequences, mask, P, temperature=temperature,
                                      return_entropy=True)
    positions = torch.tensor([[max(sum(row[:t + 1]) - 1, 0) for t in range(len(row))]
                              for row in mask.tolist()])
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(input_ids=g.sequences, attention_mask=mask,
                                                position_ids=positions).logits
    logp_all = torch.log_softmax(logits[:, P - 1:-1] / temperature, -1)
    want = logp_all.gather(-1, g.sequences[:, P:, None]).squeeze(-1)
    valid = g.response_mask.bool()
    assert logp.dtype == torch.float32 and logp.shape == (4, 6)
    torch.testing.assert_close(logp[valid].double(), want[valid], atol=1e-5, rtol=1e-5)
    want_entropy = -(logp_all.exp() * logp_all).sum(-1)
    torch.testing.assert_close(entropy[valid].double(), want_entropy[valid], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_response_logprobs_invariant_to_left_padding(make_model):
    model = make_model()
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(1, VOCAB, (1, 9), generator=gen)  # prompt 4, response 5
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(seq)], 1)
    with torch.no_grad():
        plain = response_logprobs(model, seq, torch.ones_like(seq), 4)
        shifted = response_logprobs(model, padded, mask, 7)
        # the same through a model that gets neither position ids nor logits_to_keep
        full = response_logprobs(FullLogitsOnly(model), seq, torch.ones_like(seq), 4)
    torch.testing.assert_close(shifted, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, plain, atol=1e-6, rtol=0)


def test_position_ids_reach_a_model_behind_an_engine_and_lora():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"],
                                                             fan_in_fan_out=True))
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.1))
    seq = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), seq], 1)
    mask = (padded != 0).long()
    with torch.no_grad():
        plain = response_logprobs(engine, seq, torch.ones_like(seq), 3)
        shifted = response_logprobs(engine, padded, mask, 5)
    torch.testing.assert_close(shifted, plain, atol=1e-5, rtol=0)


def test_response_values_positions_and_errors():
    critic = TinyCritic()
    g, prompt_mask = rollout(torch.Generator().manual_seed(2))
    mask = full_mask(g, prompt_mask)
    values = response_values(critic, g.sequences, mask, 5)
    torch.testing.assert_close(values, critic(g.sequences, mask)[:, 4:-1])
    with pytest.raises(ValueError, match=r"critic must return values of shape \(4, 11\)"):
        response_values(lambda ids, m: torch.zeros(4, 10), g.sequences, mask, 5)
    with pytest.raises(ValueError, match=r"prompt_len must be an int in \[1, 10\]"):
        response_values(critic, g.sequences, mask, 11)
    with pytest.raises(ValueError, match="prompt_len"):
        response_values(critic, g.sequences, mask, 0)
    with pytest.raises(ValueError, match="attention_mask must have the shape of sequences"):
        response_values(critic, g.sequences, mask[:, 1:], 5)
    with pytest.raises(TypeError, match="sequences must hold integer token ids"):
        response_values(critic, g.sequences.float(), mask, 5)


# ---------------------------------------------------------------------------- experience

def test_experience_split_select():
    g, prompt_mask = rollout(torch.Generator().manual_seed(3), batch=5)
    exp = Experience(g.sequences, full_mask(g, prompt_mask), g.response_mask.bool(), 5,
                     old_logprobs=g.logprobs, scores=torch.arange(5.0))
    assert [mb.batch_size for mb in exp.split(2)] == [2, 2, 1]
    shuffled = exp.split(2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([mb.scores for mb in shuffled]).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="micro_batch_size must be an integer >= 1"):
        exp.split(0)
    with pytest.raises(ValueError, match=r"old_logprobs must have shape \(5, 6\)"):
        Experience(g.sequences, full_mask(g, prompt_mask), g.response_mask.bool(), 5,
                   old_logprobs=g.logprobs[:, :5])


def score_fn(sequences, attention_mask, action_mask):
    return (sequences == 3).float().sum(1) - 0.5


def test_make_experience_ppo():
    actor, reference, critic = tiny_llama(0), tiny_llama(1), TinyCritic()
    g, prompt_mask = rollout(torch.Generator().manual_seed(5))
    hp = RLHParams(kl_ctl=0.1)
    exp = make_experience(g, prompt_mask, actor=actor, reference=reference, critic=critic,
                          reward_fn=score_fn, algorithm=get_algorithm("ppo"), hp=hp)
    mask = full_mask(g, prompt_mask)
    valid = g.response_mask.bool()
    assert torch.equal(exp.attention_mask, mask) and torch.equal(exp.action_mask, valid)
    for name, model in (("old_logprobs", actor), ("ref_logprobs", reference)):
        want = torch.where(valid, response_logprobs(model, g.sequences, mask, 5), 0.0)
        torch.testing.assert_close(getattr(exp, name), want.detach())
    torch.testing.assert_close(exp.scores, score_fn(g.sequences, None, None))
    assert not exp.values[~valid].any() and not exp.advantages[~valid].any()
    assert exp.advantages.requires_grad is False and exp.old_logprobs.requires_grad is False
    behaviour = make_experience(g, prompt_mask, actor=actor, reference=reference,
                                critic=critic, reward_fn=score_fn,
                                algorithm=get_algorithm("ppo"), hp=hp,
                                use_behaviour_logprobs=True)
    torch.testing.assert_close(behaviour.old_logprobs, torch.where(valid, g.logprobs, 0.0))


def test_make_experience_errors():
    actor = tiny_llama()
    g, prompt_mask = rollout(torch.Generator().manual_seed(6))
    kwargs = dict(actor=actor, reference=actor, reward_fn=score_fn,
                  algorithm=get_algorithm("grpo"), hp=RLHParams(num_samples=2))
    with pytest.raises(ValueError, match="algorithm 'ppo' needs a critic"):
        make_experience(g, prompt_mask, **{**kwargs, "algorithm": get_algorithm("ppo")})
    with pytest.raises(ValueError, match="needs a reference model"):
        make_experience(g, prompt_mask, **{**kwargs, "reference": None})
    with pytest.raises(ValueError, match=r"must return \[B\] = \(4,\) scores"):
        make_experience(g, prompt_mask, **{**kwargs, "reward_fn": lambda *a: [1.0, 2.0]})
    with pytest.raises(ValueError, match="non-finite scores"):
        make_experience(g, prompt_mask,
                        **{**kwargs, "reward_fn": lambda *a: [1.0, float("nan"), 0, 0]})
    with pytest.raises(ValueError, match="batch size 4 is not divisible by group_size 3"):
        make_experience(g, prompt_mask, **{**kwargs, "hp": RLHParams(num_samples=3)})
    with pytest.raises(ValueError, match=r"must be \[B, P\+N\]"):
        make_experience(g, prompt_mask[:, 1:], **kwargs)
