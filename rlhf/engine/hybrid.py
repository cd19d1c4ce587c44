"""The hybrid engine: one actor, switched between DeepSpeed training and fused generation.

    generate():  gather ZeRO-3 shards -> merge LoRA -> eval -> rlhf_kernels.generation
                 -> free the KV cache -> unmerge -> train mode
    train():     a context the trainer wraps its updates in, so their time is recorded too

It never touches DeepSpeed's inference kernels: generation runs on rlhf_kernels on every
device (our CPU kernels here, CUDA / Triton on GPUs).
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

from rlhf_kernels.generation import generate, unwrap

from ..models.export import gathered
from ..models.lora import merge_lora


class HybridEngine:
    """Wraps the actor's engine (or a plain module) for generation.

    Args:
        engine: a DeepSpeed engine (or an nn.Module / TorchEngine with `.module`; a peft
            model inside is unwrapped to its base model).
        eos_token_id, pad_token_id: generation's stop and fill tokens.
        backend: rlhf_kernels backend for the decode kernels ("auto").
    """

    def __init__(self, engine, *, eos_token_id, pad_token_id, backend: str = "auto"):
        self.engine, self.model = engine, unwrap(engine)
        self.eos_token_id, self.pad_token_id, self.backend = eos_token_id, pad_token_id, backend
        self.seconds: dict[str, float] = defaultdict(float)
        self.last_path = ""

    @contextlib.contextmanager
    def _timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, *, max_new_tokens: int, temperature=1.0,
                 top_k=0, top_p=1.0, generator=None):
        """Rollouts of the current policy: rlhf_kernels GenerationOutput."""
        was_training = self.model.training
        with contextlib.ExitStack() as stack:
            with self._timed("gather"):
                # merge first: merge_lora gathers its own layers and refuses an enclosing gather
                stack.enter_context(merge_lora(self.model))
                stack.enter_context(gathered(self.model))
            self.model.eval()
            with self._timed("generate"):
                out = generate(self.model, input_ids, attention_mask,
                               max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, eos_token_id=self.eos_token_id,
                               pad_token_id=self.pad_token_id, generator=generator,
                               backend=self.backend)
            self.last_path = out.path
        # leaving the stack unmerged and re-partitioned the weights; the KV cache was local
        self.model.train(was_training)
        return out

    @contextlib.contextmanager
    def train(self):
        """Times the training updates that the caller runs inside the block."""
        self.model.train()
        with self._timed("train"):
            yield

    def take_times(self) -> dict[str, float]:
        """Seconds spent per phase since the last call (gather, generate, train)."""
        times = dict(self.seconds)
        self.seconds.clear()
        return times
