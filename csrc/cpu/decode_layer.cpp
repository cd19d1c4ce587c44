// A Llama-family decoder layer for one decode step (contract in ../decode_layer.h): a
// composition of the other CPU kernels, no arithmetic of its own.
#include "../decode_layer.h"

#include "../decode.h"
#include "../rms_norm.h"
#include "../rope.h"
#include "../skinny_linear.h"
#include "../swiglu.h"

at::Tensor llama_decode_layer_cpu(const at::Tensor& h, const std::vector<at::Tensor>& norms,
                                  const std::vector<at::Tensor>& weights,
                                  const std::vector<c10::optional<at::Tensor>>& biases,
                                  double eps, double qk_eps, int64_t heads, int64_t kv_heads,
                                  const at::Tensor& cos, const at::Tensor& signed_sin,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& cache_seqlens, const at::Tensor& cache_start,
                                  double softmax_scale) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat,
              "llama_decode_layer_cpu: h must be float32 [B, hidden]");
  TORCH_CHECK(weights.size() == 7 && biases.size() == 7,
              "llama_decode_layer_cpu: weights and biases of q, k, v, o, gate, up, down");
  TORCH_CHECK(norms.size() == 2 || norms.size() == 4,
              "llama_decode_layer_cpu: norms: input, post-attention[, q, k]");
  TORCH_CHECK(heads > 0 && kv_heads > 0, "llama_decode_layer_cpu: heads must be > 0");
  const int64_t B = h.size(0), D = k_cache.size(3);
  const bool skinny = B <= SKINNY_MAX_ROWS;
  const auto linear = [&](const at::Tensor& x, size_t i) {
    return skinny ? skinny_linear_cpu(x, weights[i], biases[i])
                  : at::linear(x, weights[i], biases[i]);
  };
  // q / k / v, and gate / up, read one x: one parallel region each (the same sums)
  const auto linears = [&](const at::Tensor& x, size_t first, size_t n) {
    if (skinny)
      return skinny_linears_cpu(x, {weights.begin() + first, weights.begin() + first + n},
                                {biases.begin() + first, biases.begin() + first + n});
    std::vector<at::Tensor> out;
    for (size_t i = first; i < first + n; ++i) out.push_back(linear(x, i));
    return out;
  };
  const at::Tensor c = cos.reshape({B, D}), s = signed_sin.reshape({B, D});
  at::Tensor x = rms_norm_cpu(h, norms[0], eps);
  const std::vector<at::Tensor> qkv = linears(x, 0, 3);
  at::Tensor q = qkv[0].view({B, heads, D}), k = qkv[1].view({B, kv_heads, D});
  const at::Tensor v = qkv[2].view({B, kv_heads, D});
  if (norms.size() == 4) {
    q = rms_norm_cpu(q, norms[2], qk_eps);
    k = rms_norm_cpu(k, norms[3], qk_eps);
  }
  q = rope_cpu(q, c, s);
  k = rope_cpu(k, c, s);
  const at::Tensor attended = decode_attention_cpu(q, k_cache, v_cache, cache_seqlens, k, v,
                                                   cache_start, softmax_scale);
  const at::Tensor h1 = h + linear(attended.reshape({B, heads * D}), 3);
  x = rms_norm_cpu(h1, norms[1], eps);
  const std::vector<at::Tensor> gate_up = linears(x, 4, 2);
  return h1 + linear(swiglu_cpu(gate_up[0], gate_up[1]), 6);
}
