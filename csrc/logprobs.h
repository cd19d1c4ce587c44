// Token log-probs and entropy over the vocabulary, forward and backward.
//
// logits [B, T, V] (float32 / bfloat16 / float16), last dimension contiguous, any strides for
// B and T (so logits[:, :-1] needs no copy). labels [B, T] int64, contiguous, every label in
// [0, V) (checked in Python). z = logits * inv_temperature, computed in float32.
//   forward:  lse = LSE(z), logp = z[label] - lse, entropy = lse - sum softmax(z) * z
//   backward: with p = softmax(z),
//     grad_z[j] = g_logp * (1[j == label] - p[j]) - g_ent * p[j] * (z[j] - lse + entropy)
//     grad_logits = grad_z * inv_temperature, written once, in the logits dtype, into
//     grad_logits (its own strides; it may be the logits tensor itself: each element is read
//     before it is overwritten).
#pragma once
#include <torch/extension.h>

#include <tuple>

// Returns (logp [B, T] f32, entropy [B, T] f32 or an empty tensor, lse [B, T] f32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
    bool with_entropy);

// grad_entropy and entropy are undefined (None) when the entropy has no gradient.
void logprobs_bwd_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                      const c10::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                      const c10::optional<at::Tensor>& grad_entropy, double inv_temperature,
                      at::Tensor& grad_logits);

#ifdef RLHF_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
    bool with_entropy);

void logprobs_bwd_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                       const c10::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                       const c10::optional<at::Tensor>& grad_entropy, double inv_temperature,
                       at::Tensor& grad_logits);
#endif
