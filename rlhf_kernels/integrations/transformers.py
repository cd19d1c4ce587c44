"""Route a Hugging Face model's `generate` through rlhf_kernels.generation.

    from rlhf_kernels.integrations.transformers import apply_rlhf_kernels
    apply_rlhf_kernels(model)          # model.generate(...) now runs the fused loop
    remove_rlhf_kernels(model)         # back to HF's own

Each call resolves the *effective* generation config the way HF's `generate` does (the call's
`generation_config` and kwargs over `model.generation_config` over transformers' defaults, by
HF's own `_prepare_generation_config`), and the fused loop serves it only when every option is
one it implements exactly: greedy or sampling with temperature / top-k / top-p (HF's default
top_k=50 included, top-p of the top-k distribution as HF) / min_p, repetition_penalty,
suppress_tokens, max_new_tokens (or max_length), min_new_tokens (or min_length), eos / pad
ids. It returns what HF returns
for them: the sequences [B, P + N] padded with the pad id after EOS. Any other option with a
non-default value (other penalties and warpers, min_p with top_p < 1, beams, logits
processors, streamers, return_dict, ...), a model the fused path cannot run exactly (unmerged
LoRA, no adapter) or a transformers whose config machinery is not the one expected goes to
HF's ORIGINAL `generate` (never the patched one, which would recurse), with one log line per
reason.
"""
from __future__ import annotations

import inspect
import logging
import numbers

import torch

from ..generation import SUPPORTED_MODEL_TYPES, adapter_for, generate, unwrap
from ..generation.processors import Processing, unserved
# the layer kernels inside HF's own forwards (training forwards, gradient checkpointing)
from .training_forward import (apply_rlhf_training_kernels,  # noqa: F401
                               remove_rlhf_training_kernels)

log = logging.getLogger("rlhf_kernels.integrations")

# GenerationConfig fields the fused loop implements exactly, whatever their value
USED = {"do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
        "suppress_tokens", "max_new_tokens", "max_length", "min_new_tokens", "min_length",
        "eos_token_id", "pad_token_id"}
# fields that cannot change the output of a decoder-only sample / greedy call: metadata,
# compilation and caching switches, beam-search-only or assistant-only knobs (beams and
# assistants themselves are declined below)
INERT = {"_from_model_config", "transformers_version", "bos_token_id", "decoder_start_token_id",
         "use_cache", "disable_compile", "compile_config", "early_stopping", "length_penalty",
         "low_memory", "num_assistant_tokens", "num_assistant_tokens_schedule",
         "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
         "is_assistant", "max_matching_ngram_size", "assistant_ensemble_weight"}
SERVED = USED | INERT
# served only at their neutral value (None, transformers' global default or NEUTRAL_EXTRA)
DECLINED = {
    "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "begin_suppress_tokens", "sequence_bias",
    "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
    "remove_invalid_values", "renormalize_logits", "max_time",
    "stop_strings", "num_beams", "num_beam_groups", "diversity_penalty", "constraints",
    "force_words_ids", "penalty_alpha", "dola_layers", "num_return_sequences", "guidance_scale",
    "watermarking_config", "token_healing", "output_scores", "output_logits",
    "output_attentions", "output_hidden_states", "return_dict_in_generate",
    "prompt_lookup_num_tokens", "assistant_early_exit", "speculation_type", "use_mtp",
    "cache_implementation", "cache_config", "max_cache_len", "prefill_chunk_size",
    "continuous_batching_config"}
NEUTRAL_EXTRA = {"renormalize_logits": False, "token_healing": False,
                 "output_logits": False, "output_attentions": False,
                 "output_hidden_states": False, "use_mtp": False}
# arguments of HF's generate outside the config: served only when not given
CALL_ARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
             "assistant_model", "streamer", "negative_prompt_ids",
             "negative_prompt_attention_mask", "custom_generate", "trust_remote_code")
_said = set()


class Declined(Exception):
    """The call is not one the fused loop serves exactly; the message says why."""


def _say_once(reason):
    if reason not in _said:
        _said.add(reason)
        log.warning("rlhf_kernels: generate falls back to HF: %s", reason)


def _resolve(hf, generation_config, kwargs):
    """(effective GenerationConfig, model kwargs) by transformers' own machinery."""
    prepare = getattr(hf, "_prepare_generation_config", None)
    params = list(inspect.signature(prepare).parameters.values()) if callable(prepare) else []
    if not params or params[0].name != "generation_config" \
            or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        raise Declined("this transformers has no _prepare_generation_config(generation_config,"
                       " **kwargs) to resolve the generation config with")
    try:
        resolved = prepare(generation_config, **kwargs)
    except Exception as err:  # HF's generate raises its own error for it
        raise Declined(f"resolving the generation config failed ({err})") from None
    if not (isinstance(resolved, tuple) and len(resolved) == 2):
        raise Declined("_prepare_generation_config returned an unexpected value")
    return resolved


def _check_declined(config):
    """Declined unless every option outside SERVED has its neutral value."""
    defaults = config._get_default_generation_params() \
        if hasattr(config, "_get_default_generation_params") else {}
    for name, value in config.to_dict().items():
        if name in SERVED or value is None:
            continue
        if name in DECLINED and (value == defaults.get(name, None)
                                 or value == NEUTRAL_EXTRA.get(name, None)):
            continue
        what = "is not served" if name in DECLINED else "is unknown to rlhf_kernels"
        raise Declined(f"{name}={value!r} {what}")


def _new_tokens(hf, config, user_config, kwargs, prompt_len):
    """HF's `_prepare_generated_length`: max_new_tokens wins; a max_length nobody set means
    20 new tokens (capped by max_position_embeddings); a set one counts the prompt."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    default_max = kwargs.get("max_length") is None \
        and (user_config is None or user_config.max_length is None) \
        and hf.generation_config.max_length is None
    total = config.max_length
    if default_max:
        total += prompt_len
        limit = getattr(hf.config, "max_position_embeddings", None)
        total = min(total, limit) if limit is not None else total
    if total - prompt_len < 1:
        raise Declined(f"max_length={config.max_length} leaves no new token for a "
                       f"{prompt_len}-token prompt")
    return total - prompt_len


def _prompt_learning(model, hf):
    """Whether a peft prompt-learning adapter (prompt / prefix tuning) is active: its virtual
    tokens enter through the inputs peft prepares, which the fused loop never sees. Found on
    the peft model itself, or (peft wrapping the patched model) as the owner of the
    prepare_inputs_for_generation peft installs on the base model for the call."""
    owners = (model, getattr(hf.__dict__.get("prepare_inputs_for_generation"), "__self__", None))
    return any(getattr(getattr(owner, "active_peft_config", None), "is_prompt_learning", False)
               for owner in owners)


def _plan(model, args, kwargs):
    """The fused `generate` arguments for this call, or Declined with the reason."""
    if len(args) > 1:
        raise Declined("positional arguments after the prompt ids")
    given = [name for name in CALL_ARGS if kwargs.get(name) not in (None, False)]
    if given:
        raise Declined(f"{given[0]} is not served")
    hf = unwrap(model)
    if _prompt_learning(model, hf):
        raise Declined("a peft prompt-learning adapter (virtual tokens) is not served")
    rest = {k: v for k, v in kwargs.items() if k not in CALL_ARGS and k != "generation_config"}
    ids = args[0] if args else rest.pop("inputs", None)
    ids = rest.pop("input_ids", None) if ids is None else ids
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise Declined("no [B, P] input_ids tensor (inputs_embeds or other inputs)")
    user_config = kwargs.get("generation_config")
    config, model_kwargs = _resolve(hf, user_config, rest)
    extra = sorted(k for k, v in model_kwargs.items()
                   if k not in ("attention_mask", "use_cache") and v is not None)
    if extra:
        raise Declined(f"model input {extra[0]!r} is not served")
    _check_declined(config)
    if model_kwargs.get("attention_mask") is None and config.pad_token_id is not None \
            and bool((ids == config.pad_token_id).any()):
        # HF infers a mask from the pad id here; the fused loop would attend to those tokens
        raise Declined("no attention_mask and pad tokens in the prompts")
    sample = bool(config.do_sample)
    if sample and not (config.temperature or 0) > 0:
        raise Declined(f"do_sample with temperature={config.temperature!r}")
    adapter, why = adapter_for(hf)
    if adapter is None:
        raise Declined(why)
    sampling = dict(temperature=config.temperature, top_k=config.top_k or 0,
                    top_p=config.top_p if config.top_p is not None else 1.0,
                    min_p=config.min_p or 0.0) if sample else dict(temperature=0.0)
    return dict(model=hf, input_ids=ids, attention_mask=model_kwargs.get("attention_mask"),
                max_new_tokens=_new_tokens(hf, config, user_config, kwargs, ids.shape[1]),
                **sampling, **_processing(hf, config, sample, ids.shape[1]),
                eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)


def _min_new_tokens(config, prompt_len):
    """HF's minimum length as new tokens: min_new_tokens wins (HF then sets min_length to it
    plus the prompt's width); a min_length alone counts the padded prompt. Either masks EOS
    only, so a value that HF's processors would skip (<= 0) is 0. Not an integer: Declined."""
    for name in ("min_new_tokens", "min_length"):
        value = getattr(config, name, None)
        if value is not None and (not isinstance(value, numbers.Integral)
                                  or isinstance(value, bool)):
            raise Declined(f"{name}={value!r} is not an integer")
    if config.min_new_tokens is not None:
        return max(int(config.min_new_tokens), 0)
    return max(int(config.min_length or 0) - prompt_len, 0)


def _processing(hf, config, sample, prompt_len):
    """repetition_penalty, suppress_tokens and the minimum length as the fused loop takes them,
    or Declined: an option HF takes and the loop refuses, min_p with top_p < 1, a repetition
    penalty that this transformers applies to the left padding too."""
    penalty = config.repetition_penalty if config.repetition_penalty is not None else 1.0
    if penalty != 1.0 and not isinstance(penalty, float):  # HF's processor raises for it
        raise Declined(f"repetition_penalty={penalty!r} is not a float")
    try:
        processing = Processing.checked(penalty, config.suppress_tokens,
                                        (config.min_p or 0.0) if sample else 0.0,
                                        _min_new_tokens(config, prompt_len))
    except (TypeError, ValueError) as err:
        raise Declined(str(err)) from None
    why = unserved(config.temperature if sample else 0.0,
                   config.top_p if config.top_p is not None else 1.0, processing.min_p)
    if why is not None:
        raise Declined(why)
    if processing.repetition_penalty != 1.0 and not _penalty_skips_left_padding(hf):
        raise Declined(f"repetition_penalty={penalty}: this transformers also penalises the "
                       f"prompts' left padding, the fused loop does not")
    return dict(repetition_penalty=processing.repetition_penalty,
                suppress_tokens=processing.suppress_tokens,
                min_new_tokens=processing.min_new_tokens)


_PROBE = {}


def _penalty_skips_left_padding(hf) -> bool:
    """Whether HF's repetition penalty leaves out the prompts' left padding (the installed
    transformers passes it the attention mask's padding lengths; older ones penalise every
    input id): asked of HF's own processor list once per process, on a 2-token prompt
    [pad, token]."""
    if "skips" not in _PROBE:
        try:
            from transformers import GenerationConfig
            processors = hf._get_logits_processor(
                generation_config=GenerationConfig(repetition_penalty=2.0),
                input_ids_seq_length=2, device="cpu",
                model_kwargs={"attention_mask": torch.tensor([[0, 1]])})
            scores = processors(torch.tensor([[1, 2]]), torch.ones(1, 4))
            _PROBE["skips"] = scores[0].tolist() == [1.0, 1.0, 0.5, 1.0]
        except Exception:  # another signature or behaviour: not the one the loop reproduces
            _PROBE["skips"] = False
    return _PROBE["skips"]


def _fused_generate(model, original):
    """`original` is the generate this replaces (bound to `model`): every declined call goes
    to it, never to `model.generate`, which is this wrapper again (peft's generate calls the
    base model's `generate`, so a fallback through it would recurse)."""
    def generate_with_rlhf_kernels(*args, **kwargs):
        try:
            plan = _plan(model, args, kwargs)
        except Declined as why:
            _say_once(str(why))
            return original(*args, **kwargs)
        call = plan.pop("model")
        return generate(call, **plan).sequences
    return generate_with_rlhf_kernels


def apply_rlhf_kernels(model):
    """Patches `model.generate` (this instance only). Returns the model. A model family with
    no adapter is left alone, with one log line saying so. Works on a peft model too, and a
    patched model can be wrapped by peft afterwards (LoRA unmerged: every call goes to HF)."""
    # __dict__, not hasattr: a peft model forwards attribute lookups to the patched base model
    if "_rlhf_kernels_original_generate" in model.__dict__:
        return model
    # a supported family whose feature is unsupported now (unmerged LoRA) is still patched:
    # each call checks again and goes to HF while it lasts
    adapter, why = adapter_for(unwrap(model))
    if adapter is None and adapter_family(model) not in SUPPORTED_MODEL_TYPES:
        log.warning("apply_rlhf_kernels: %s; generate() left as it is", why)
        return model
    original = model.generate
    model._rlhf_kernels_original_generate = original
    model.generate = _fused_generate(model, original)
    log.info("apply_rlhf_kernels: %s.generate -> rlhf_kernels.generation", type(model).__name__)
    return model


def adapter_family(model):
    """The model_type of the HF model inside `model` (its wrappers unwrapped)."""
    return getattr(getattr(unwrap(model), "config", None), "model_type", None)


def remove_rlhf_kernels(model):
    original = model.__dict__.pop("_rlhf_kernels_original_generate", None)
    if original is not None:
        del model.generate
    return model
