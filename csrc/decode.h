// Decode attention and sampling (one new token per sequence), shared by bindings.cpp and the
// CPU / CUDA sources. Argument checks that need values (lengths within the cache, labels...)
// are done in Python; these check layouts.
//
// decode_attention: q [B, Hq, D]; k_cache, v_cache [B, Hkv, S, D] contiguous, same dtype as q
// (float32 / bfloat16 / float16); Hq a multiple of Hkv (query head h reads KV head
// h / (Hq / Hkv)); cache_seqlens [B] int32 = tokens already cached; cache_start [B] int32 or
// None (= 0): positions before it are padding. With k_new / v_new [B, Hkv, D] they are written
// into the caches at position cache_seqlens[b] first, and attention covers positions
// [cache_start[b], cache_seqlens[b]] (the new token included); without them it covers
// [cache_start[b], cache_seqlens[b]). Softmax in float32; a sequence with no visible position
// gets 0. Returns out [B, Hq, D] in q's dtype.
//
// sample: logits [B, V] (float32 / bfloat16 / float16), temperature > 0, top_k >= 0 (0 = off),
// top_p in (0, 1], uniforms [B] float32 in [0, 1) drawn by the caller (on the logits' device:
// no host sync). z = logits / temperature; the kept set is the top_k largest z (ties at the
// k-th value kept) intersected with the tokens whose strictly-more-probable mass is < top_p
// (under softmax(z) over the full vocabulary); the token is the inverse CDF of the kept,
// renormalised distribution at u, walking the vocabulary in index order. Returns tokens [B]
// int64 and logprobs [B] float32 = log_softmax(z)[token] over the full vocabulary.
// Non-finite z: the rule stated in rlhf_kernels/reference/sample.py. A row holding +inf is
// sampled as if z were 0 at its +inf tokens and -inf elsewhere (log-prob -log(count)); a row
// holding NaN gets token -1, one that is -inf everywhere token -2, both log-prob NaN. The
// kernels never raise (no host sync: CUDA graphs); the Python callers check the tokens.
#pragma once
#include <torch/extension.h>

#include <array>
#include <tuple>

// The head dims the CUDA decode-attention kernel is built for: the one list (bindings.cpp
// exports it as decode_cuda_head_dims; Python's rlhf_kernels._backends.DECODE_CUDA_HEAD_DIMS
// is checked against it by tests/test_decode.py).
constexpr std::array<int64_t, 5> DECODE_CUDA_HEAD_DIMS = {64, 80, 96, 128, 256};

constexpr bool decode_cuda_head_dim_supported(int64_t d) {
  for (const int64_t h : DECODE_CUDA_HEAD_DIMS)
    if (h == d) return true;
  return false;
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                const c10::optional<at::Tensor>& k_new,
                                const c10::optional<at::Tensor>& v_new,
                                const c10::optional<at::Tensor>& cache_start,
                                double softmax_scale);

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits, double temperature,
                                              int64_t top_k, double top_p,
                                              const at::Tensor& uniforms);

#ifdef RLHF_WITH_CUDA
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                 const c10::optional<at::Tensor>& k_new,
                                 const c10::optional<at::Tensor>& v_new,
                                 const c10::optional<at::Tensor>& cache_start,
                                 double softmax_scale);

std::tuple<at::Tensor, at::Tensor> sample_cuda(const at::Tensor& logits, double temperature,
                                               int64_t top_k, double top_p,
                                               const at::Tensor& uniforms);
#endif
