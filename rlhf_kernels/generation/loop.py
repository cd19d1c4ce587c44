"""The generation loop: prefill into a static KV cache, then one fused decode step per token.

    prefill   prompt [B, P] (left padded) -> SDPA, K / V written to cache slots [0, P)
    decode    token t of every sequence   -> our decode-attention kernel appends K / V at slot
              P + t and attends over [pads_b, P + t]; the sampler returns token + log-prob
              (greedy when temperature is 0); finished rows emit pad_token_id.

The sampled distribution is HF `generate`'s for the same options: repetition_penalty,
suppress_tokens, min_p and top_k with top_p < 1 run in processors.py (HF's order and arithmetic)
before the sampler; min_p with top_p < 1 is not served and takes the HF path.
The behaviour log-probs are those of the model's own distribution at the sampling temperature,
log_softmax(logits / T)[token] over the full vocabulary (log_softmax(logits) when greedy), what
training recomputes, whatever the processors did to the sampled distribution.

Every step has the same shapes and touches only preallocated tensors, so on CUDA it is
captured once as a CUDA graph and replayed. Without a graph (the CPU), finished rows are
dropped from the batch instead. Models with no adapter go through HF `generate`.

Non-finite logits follow the rule in rlhf_kernels/reference/sample.py: the sampler marks a row
holding NaN (or -inf everywhere) with a token < 0 and never syncs; the loop ends that sequence
(its next input is the pad token, a valid id) and raises ValueError naming the sequences at the
next host check it already does (every 16 steps on CUDA, every step on the CPU) or at the end,
instead of returning pads or garbage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import decode as decode_ops
from ..reference import sample as ref_sample
from .adapters import adapter_for, unwrap
from .adapters.attention import DecodeAttention, PrefillAttention
from .cache import StaticKVCache
from .fallback import hf_generate, position_ids_from_mask, say_once
from .processors import LogitsProcessors, Processing, unserved


@dataclass
class GenerationOutput:
    sequences: torch.Tensor       # [B, P + N]: the prompts as given, then the responses
    logprobs: torch.Tensor        # [B, N] float32 behaviour log-probs (0 after EOS)
    response_mask: torch.Tensor   # [B, N] int64: 1 up to and including EOS
    path: str = ""                # "fused:<family>" or "fallback: <reason>"


def new_cache(model, batch: int, max_len: int) -> StaticKVCache:
    """A cache `generate(..., cache=)` can reuse for batches <= `batch`, lengths <= `max_len`."""
    adapter, why = adapter_for(unwrap(model))
    if adapter is None:
        raise ValueError(f"no fused generation for this model: {why}")
    return _allocate(adapter, batch, max_len)


def _allocate(adapter, batch, max_len):
    return StaticKVCache(adapter.num_layers, batch, adapter.kv_heads, max_len, adapter.head_dim,
                         dtype=adapter.dtype, device=adapter.device)


def _check_prompts(input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [B, P] tensor of token ids")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids is empty: the batch has no prompt")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no token: every prompt needs at least one")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from "
                         f"input_ids {tuple(input_ids.shape)}")
    mask = attention_mask.to(input_ids.device).long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask must be left padded (zeros first, then ones): pad "
                         "prompts on the left (tokenizer.padding_side = 'left')")
    if bool((mask[:, -1] == 0).any()):
        rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"prompts {rows} are empty (attention_mask all 0)")
    return mask


def _check_token_ids(model, input_ids):
    """Token ids outside the embedding table are an index error on the CPU and a device-side
    assert on CUDA (which poisons the whole context): check them on the host first."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        return
    bad = (input_ids < 0) | (input_ids >= vocab)
    if bool(bad.any()):
        rows = bad.any(-1).nonzero().flatten().tolist()
        first = input_ids[bad][0].item()
        raise ValueError(f"input_ids must be token ids in [0, {vocab}) (the model's vocabulary): "
                         f"prompts {rows} hold ids outside it (e.g. {first}); padding "
                         f"positions are embedded too, so pad with a valid id")


def _eos_tensor(model, eos_token_id, device):
    if eos_token_id is None:
        config = getattr(model, "generation_config", None) or model.config
        eos_token_id = getattr(config, "eos_token_id", None)
    ids = [] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    return torch.tensor(ids, dtype=torch.long, device=device)


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, suppress_tokens=None, min_p: float = 0.0,
             min_new_tokens: int = 0, eos_token_id=None, pad_token_id=None, generator=None,
             cache: StaticKVCache | None = None, cuda_graph: bool = True, fused: bool = True,
             backend: str = "auto") -> GenerationOutput:
    """Sample (or greedily pick, temperature=0) up to `max_new_tokens` tokens per prompt.

    The options mean what they mean in HF `generate` (with do_sample = temperature > 0), in its
    order: repetition_penalty (1 = off; the prompt's tokens count, its left padding does not),
    min_new_tokens (no EOS before that many new tokens; 0 = off), suppress_tokens (ids never
    emitted), then when sampling temperature, top_k (0 = off),
    top_p (top-p of the top-k distribution), min_p (0 = off).
    `logprobs` are log_softmax(logits / T)[token] of the model's unprocessed logits (see the
    module's docstring), 0 after EOS.
    Stops early when every sequence has emitted EOS, so N <= max_new_tokens (as HF does).
    `max_new_tokens=0` returns the prompts and empty [B, 0] log-probs / mask.
    `generator` seeds the draws of the fused path (a torch.Generator on any device: the draws are
    made on its device, then moved to the model's).
    `fused=False` takes the HF path even when an adapter exists (the baseline of benchmarks).
    """
    temperature, top_k, top_p = decode_ops.check_sampling(temperature, top_k, top_p)
    processing = Processing.checked(repetition_penalty, suppress_tokens, min_p, min_new_tokens)
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
    model = unwrap(model)
    mask = _check_prompts(input_ids, attention_mask)
    _check_token_ids(model, input_ids)
    eos = _eos_tensor(model, eos_token_id, input_ids.device)
    if pad_token_id is None:
        pad_token_id = getattr(model.generation_config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (
            int(eos[0]) if len(eos) else 0)
    batch, prompt_len = input_ids.shape
    if max_new_tokens == 0:
        empty = torch.zeros(batch, 0, device=input_ids.device)
        return GenerationOutput(input_ids, empty, empty.long(), "empty")
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, processing=processing, eos_ids=eos, pad_token_id=pad_token_id)
    adapter, why = adapter_for(model) if fused else (None, "fused path turned off (fused=False)")
    why = why if adapter is None else unserved(temperature, top_p, processing.min_p)
    if why is not None:
        if fused:
            say_once(why)
        return _generate_with_hf(model, input_ids, mask, why, options)
    total = prompt_len + max_new_tokens
    adapter.check_length(total)
    layout = (adapter.num_layers, batch, adapter.kv_heads, total, adapter.head_dim,
              adapter.dtype, adapter.device)
    if cache is None or not cache.fits(*layout):
        if cache is not None:
            raise ValueError(f"the given cache ({cache.batch} x {cache.max_len}, layout "
                             f"{cache.layout}) cannot hold batch {batch} x {total} tokens of "
                             f"this model")
        cache = _allocate(adapter, batch, total)
    decoder = _Decoder(adapter, cache, input_ids.to(adapter.device), mask.to(adapter.device),
                       backend, use_graph=cuda_graph and adapter.device.type == "cuda"
                       and adapter.graph_safe)
    options["eos_ids"] = eos.to(adapter.device)
    tokens, logp, response_mask = decoder.run(generator=generator, **options)
    sequences = torch.cat([input_ids, tokens.to(input_ids.device, input_ids.dtype)], 1)
    return GenerationOutput(sequences, logp, response_mask, f"fused:{adapter.family}")


def _generate_with_hf(model, input_ids, mask, why, options):
    response, logp, response_mask = hf_generate(model, input_ids, mask, **options)
    # HF's greedy path picks a token from NaN logits without a word: the log-probs of the
    # teacher-forced forward show it
    nan_rows = (torch.isnan(logp) & (response_mask != 0)).any(-1)
    if bool(nan_rows.any()):
        raise ref_sample.NonFiniteLogitsError(
            f"generate: sequences {nan_rows.nonzero().flatten().tolist()} got "
            f"NaN log-probs: the model produced NaN logits (look for NaN or "
            f"inf in its weights, inputs or activations)")
    return GenerationOutput(torch.cat([input_ids, response], 1), logp, response_mask,
                            f"fallback: {why}")


class _Decoder:
    """The state of one generation: static step inputs, the cache, the captured step."""

    def __init__(self, adapter, cache, input_ids, mask, backend, use_graph):
        self.adapter, self.cache = adapter, cache
        batch, prompt_len = input_ids.shape
        device = adapter.device
        self.kernel = decode_ops.attention_kernel(backend, device, adapter.head_dim,
                                                   adapter.dtype)
        adapter.use_kernels(backend)
        adapter.tabulate_positions(cache.max_len)  # positions never pass the cache's length
        self.sample = decode_ops.sample_kernel(backend, device, adapter.dtype)
        self.backend, self.use_graph = backend, use_graph
        self.input_ids, self.mask = input_ids, mask
        positions = position_ids_from_mask(mask)
        # static inputs of the decode step, updated in place between steps
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = positions[:, -1:] + 1
        self.length = torch.full((batch,), prompt_len, dtype=torch.int32, device=device)
        self.start = (prompt_len - mask.sum(-1)).to(torch.int32)
        self.prompt_positions = positions

    def prefill(self):
        """Logits of the prompts' last positions, their K / V in the cache. Identical prompts
        (GRPO / RLOO sample a group of completions per prompt) are run once: the distinct rows
        fill the cache's first rows, then every row gets its prompt's keys and values."""
        distinct, inverse = torch.unique(torch.cat([self.input_ids, self.mask], 1), dim=0,
                                         return_inverse=True)
        if len(distinct) == len(inverse):
            attend = PrefillAttention(self.cache, self.mask, self.adapter.windows)
            return self.adapter.forward(self.input_ids, self.prompt_positions, attend)
        ids, mask = distinct.split(self.input_ids.shape[1], 1)
        attend = PrefillAttention(self.cache, mask, self.adapter.windows)
        logits = self.adapter.forward(ids, position_ids_from_mask(mask), attend)
        length, batch = ids.shape[1], len(inverse)
        for layer in range(self.adapter.num_layers):
            for cache in self.cache.layer(layer, batch):
                cache[:, :, :length] = cache[inverse, :, :length]  # (a gathered copy)
        return logits[inverse]

    def step(self):
        attend = DecodeAttention(self.cache, self.kernel, self.length, self.start,
                                 self.adapter.windows)
        return self.adapter.forward(self.token, self.position, attend)

    def graphed_step(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compile / autotune outside the capture
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.step()

        def replay():
            graph.replay()
            return logits
        return replay

    def choose(self, logits, sampling, generator, rows):
        """(tokens, log-probs); a token < 0 marks an error row (reference/sample.py)."""
        temperature, top_k, top_p, processors = sampling
        raw = logits
        if processors is not None:
            logits, top_k = processors(logits, rows), processors.sampler_top_k
        if temperature == 0:
            token, token_logp = ref_sample.greedy(logits)
        else:
            uniforms = ref_sample.draw_uniforms(logits.shape[0], generator, logits.device)
            token, token_logp = self.sample(logits, temperature, top_k, top_p, uniforms)
        if processors is not None:  # the model's own log-probs, not the processed ones
            token_logp = processors.behaviour_logprobs(raw, token)
        return token, token_logp

    def compact(self, keep, length):
        """Drop finished rows: the rows `keep` (indices into the current batch) move to the
        front of the step inputs and of the cache's first `length` slots."""
        for layer in range(self.adapter.num_layers):
            for cache in self.cache.layer(layer, self.token.shape[0]):
                cache[:len(keep), :, :length] = cache[keep, :, :length]
        self.token, self.position = self.token[keep], self.position[keep]
        self.length, self.start = self.length[keep], self.start[keep]

    @torch.no_grad()
    def run(self, max_new_tokens, temperature, top_k, top_p, processing, eos_ids, pad_token_id,
            generator):
        """Without a CUDA graph the batch shrinks as sequences finish (`rows`: the original
        row of each one still running), once a quarter of it has ended: later steps cost what
        the running sequences need, which matters when a few long answers outlast the rest."""
        batch, device, eos = self.token.shape[0], self.token.device, eos_ids
        processors = LogitsProcessors(processing, self.input_ids, self.mask,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      eos_ids=eos) \
            if processing.active(temperature, top_k, top_p) else None
        sampling = (temperature, top_k, top_p, processors)
        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long,
                            device=device)
        logp = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
        alive = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        rows = torch.arange(batch, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        # per original row: the sampler's error code (< 0, reference/sample.py) and the step
        errors = torch.zeros(batch, dtype=torch.long, device=device)
        error_step = torch.zeros(batch, dtype=torch.long, device=device)
        step = None
        logits = self.prefill()
        check_every = 16 if device.type == "cuda" else 1   # all-finished test = a host sync
        for t in range(max_new_tokens):
            token, token_logp = self.choose(logits, sampling, generator, rows)
            # an error row ends its sequence: no token < 0 is stored or fed to the embedding
            failed = (token < 0) & ~finished
            errors[rows] = torch.where(failed, token, errors[rows])
            error_step[rows] = torch.where(failed, t, error_step[rows])
            finished |= failed
            tokens[rows, t] = torch.where(finished, pad_token_id, token)
            if processors is not None:
                processors.observe(tokens[rows, t], rows)
            logp[rows, t] = torch.where(finished, 0.0, token_logp.float())
            alive[rows, t] = (~finished).long()
            finished |= torch.isin(token, eos)
            if t + 1 == max_new_tokens:
                break
            if (t + 1) % check_every == 0:
                # one host sync for both, as before: running sequences and error rows
                running, failures = torch.stack([(~finished).sum(),
                                                 (errors != 0).sum()]).tolist()
                if failures:
                    _raise_sampling_errors(errors, error_step)
                if running == 0:
                    break
                if not self.use_graph and running <= len(rows) * 3 // 4:
                    keep = (~finished).nonzero().flatten()
                    self.compact(keep, int(self.length.max()))
                    rows, finished = rows[keep], finished[keep]
            self.token[:, 0] = tokens[rows, t]
            if step is None:
                step = self.graphed_step() if self.use_graph else self.step
            logits = step()
            self.length += 1
            self.position += 1
        if bool((errors != 0).any()):
            _raise_sampling_errors(errors, error_step)
        # as HF: the responses end at the last step where some sequence was still running
        steps = int(alive.any(0).nonzero().max()) + 1
        return tokens[:, :steps], logp[:, :steps], alive[:, :steps]


def _raise_sampling_errors(errors, error_step):
    """NonFiniteLogitsError naming the sequences whose logits broke the sampling rule, and
    when."""
    steps = error_step[errors != 0].cpu()
    raise ref_sample.NonFiniteLogitsError(
        f"generate: {ref_sample.row_errors(errors, 'the logits of sequence(s)')} "
        f"(first at new token {int(steps.min())})")
