// One decoder layer of a Llama-family model for a decode step, on the CPU: the same kernels,
// in the same order, as the generation adapter's Python block (rlhf_kernels/generation/adapters/
// llama.py), so the result is bit for bit that block's; one call instead of ~35 Python-level
// ops per layer, whose dispatch was a tenth of a 135M-parameter model's decode step.
//
//   x = rms_norm(h, norms[0]);  q, k, v = x @ W^T (+ b)  [q / k through norms[2] / norms[3]
//   when given]; q, k = rope(q, k); a = decode_attention(q, cache, append k / v)
//   h = h + a @ Wo^T;  x = rms_norm(h, norms[1]);  h = h + swiglu(x @ Wg^T, x @ Wu^T) @ Wd^T
//
// h [B, hidden] float32; weights q, k, v, o, gate, up, down (nn.Linear layout, read in place),
// biases in the same order (None where absent); cos / signed_sin [B, D] (this step's
// positions); caches [B, Hkv, S, D] with cache_seqlens / cache_start as decode_attention_cpu.
// Projections of <= SKINNY_MAX_ROWS rows run skinny_linear_cpu, larger ones at::linear (as the
// adapter's linear does). Returns the new h [B, hidden].
#pragma once
#include <torch/extension.h>

#include <vector>

at::Tensor llama_decode_layer_cpu(const at::Tensor& h, const std::vector<at::Tensor>& norms,
                                  const std::vector<at::Tensor>& weights,
                                  const std::vector<c10::optional<at::Tensor>>& biases,
                                  double eps, double qk_eps, int64_t heads, int64_t kv_heads,
                                  const at::Tensor& cos, const at::Tensor& signed_sin,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& cache_seqlens, const at::Tensor& cache_start,
                                  double softmax_scale);
