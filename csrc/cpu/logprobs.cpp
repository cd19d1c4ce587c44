// Token log-probs and entropy on the CPU: one pass over each row of logits forward, one pass
// backward (contract in ../logprobs.h). Rows run in parallel; within a row, chunks of C logits
// are scaled into an L1 buffer, their max updates a running max (online log-sum-exp), and one
// vectorised exp per logit feeds the running sums
//   s = sum exp(z - m),  u = sum exp(z - m) * (z - m)
// so that lse = m + log s and entropy = log s - u / s (relative to m: no cancellation).
// The row loops are built twice, 8 lanes for x86-64-v3 and 4 for the baseline (vec_math.h).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../logprobs.h"
#include "vec_math.h"

namespace {

using namespace rlhf_cpu;
constexpr int64_t C = 2048;  // logits per chunk: 8 KB of float32 in L1
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

template <typename acc_t>
struct RowStats {
  acc_t logp, entropy, lse;
};

// float32 math for float32 / bfloat16 / float16 logits, float64 for float64 (gradcheck)
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// float64 logits (gradcheck): the plain two-pass loops in double, no SIMD.
RowStats<double> forward_row_f64(const double* x, int64_t V, double inv_t, int64_t label) {
  double m = -std::numeric_limits<double>::infinity(), s = 0, u = 0;
  for (int64_t j = 0; j < V; ++j) m = std::max(m, x[j] * inv_t);
  for (int64_t j = 0; j < V; ++j) {
    const double d = x[j] * inv_t - m, e = std::exp(d);
    s += e;
    u += e > 0 ? e * d : 0.0;
  }
  const double log_s = std::log(s);
  return {x[label] * inv_t - m - log_s, log_s - u / s, m + log_s};
}

void backward_row_f64(const double* x, double* g, int64_t V, double inv_t, int64_t label,
                      double lse, double ent, double g_logp, double g_ent) {
  const double x_label = x[label] * inv_t;
  for (int64_t j = 0; j < V; ++j) {
    const double z = x[j] * inv_t, p = std::exp(z - lse);
    g[j] = (p > 0 ? -p * (g_logp + g_ent * (z - lse + ent)) : 0.0) * inv_t;
  }
  const double p = std::exp(x_label - lse);
  g[label] = (g_logp * (1 - p) - (p > 0 ? g_ent * p * (x_label - lse + ent) : 0.0)) * inv_t;
}

template <int W, typename scalar_t>
RLHF_INLINE RowStats<acc_type<scalar_t>> forward_row(const scalar_t* x, int64_t V, double inv_t,
                                                     int64_t label) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return forward_row_f64(x, V, inv_t, label);
  } else {
  alignas(64) float z[C];
  const float inv_tf = static_cast<float>(inv_t);
  float m = NEG_INF, s = 0.f, u = 0.f;
  for (int64_t c0 = 0; c0 < V; c0 += C) {
    const int64_t n = std::min(C, V - c0), full = n / W * W, padded = (n + W - 1) / W * W;
    vfloat<W> vmax = vsplat<W>(NEG_INF);
    for (int64_t i = 0; i < full; i += W) {
      const vfloat<W> zz = load_float<W>(x + c0 + i) * inv_tf;
      vstore(z + i, zz);
      vmax = zz > vmax ? zz : vmax;
    }
    float cmax = hmax<W>(vmax);
    for (int64_t i = full; i < padded; ++i) {
      z[i] = i < n ? static_cast<float>(x[c0 + i]) * inv_tf : NEG_INF;  // -inf pads: exp = 0
      cmax = std::max(cmax, z[i]);
    }
    if (cmax == NEG_INF) continue;  // nothing but -inf so far: contributes 0
    if (cmax > m) {                 // rescale the sums to the new max
      const float scale = m == NEG_INF ? 0.f : std::exp(m - cmax);
      u = scale * (u + (m == NEG_INF ? 0.f : (m - cmax) * s));
      s *= scale;
      m = cmax;
    }
    vfloat<W> vs = {}, vu = {};
    for (int64_t i = 0; i < padded; i += W) {
      const vfloat<W> d = vload<vfloat<W>>(z + i) - m;
      const vfloat<W> e = vexp<W>(d);
      vs += e;
      vu += e > 0.f ? e * d : vsplat<W>(0.f);  // 0 * -inf would be NaN
    }
    s += hsum<W>(vs);
    u += hsum<W>(vu);
  }
  const float log_s = std::log(s);
  const float lse = m + log_s;
  return {static_cast<float>(x[label]) * static_cast<float>(inv_t) - lse, log_s - u / s, lse};
  }
}

template <int W, typename scalar_t, typename acc_t = acc_type<scalar_t>>
RLHF_INLINE void backward_row(const scalar_t* x, scalar_t* g, int64_t V, double inv_td,
                              int64_t label, acc_t lse, acc_t ent, acc_t g_logp, acc_t g_ent) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return backward_row_f64(x, g, V, inv_td, label, lse, ent, g_logp, g_ent);
  } else {
  const float inv_t = static_cast<float>(inv_td);
  // grad_z = g_logp * (1[j == label] - p) - g_ent * p * (z - lse + ent), times 1/temperature.
  // The label's own term is done last from its saved logit: g may be x (in place).
  const float x_label = static_cast<float>(x[label]) * inv_t;
  const float shift = ent - lse;
  const int64_t full = V / W * W;
  for (int64_t i = 0; i < full; i += W) {
    const vfloat<W> zz = load_float<W>(x + i) * inv_t;
    const vfloat<W> p = vexp<W>(zz - lse);
    const vfloat<W> gz = p > 0.f ? -p * (g_logp + g_ent * (zz + shift)) : vsplat<W>(0.f);
    store_from_float<W>(g + i, gz * inv_t);
  }
  for (int64_t i = full; i < V; ++i) {
    const float zz = static_cast<float>(x[i]) * inv_t;
    const float p = std::exp(zz - lse);
    g[i] = static_cast<scalar_t>(p > 0.f ? -p * (g_logp + g_ent * (zz + shift)) * inv_t : 0.f);
  }
  const float p = std::exp(x_label - lse);
  const float gz = g_logp * (1.f - p) - (p > 0.f ? g_ent * p * (x_label + shift) : 0.f);
  g[label] = static_cast<scalar_t>(gz * inv_t);
  }
}

// Rows [lo, hi) of the flattened [B, T]: what one thread runs, built per instruction set.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
struct Rows {
  const scalar_t* x;
  scalar_t* g;  // backward only
  int64_t T, V, sb, st, gb, gt;
  double inv_t;
  const int64_t* labels;
  acc_t *logp, *lse, *entropy;                      // forward outputs (entropy may be null)
  const acc_t *lse_in, *ent_in, *g_logp, *g_ent;    // backward inputs (ent_in, g_ent may be null)
};

template <int W, typename scalar_t>
RLHF_INLINE void forward_rows(const Rows<scalar_t>& a, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    const auto r = forward_row<W>(a.x + (i / a.T) * a.sb + (i % a.T) * a.st, a.V, a.inv_t,
                                  a.labels[i]);
    a.logp[i] = r.logp;
    a.lse[i] = r.lse;
    if (a.entropy) a.entropy[i] = r.entropy;
  }
}

template <int W, typename scalar_t, typename acc_t = acc_type<scalar_t>>
RLHF_INLINE void backward_rows(const Rows<scalar_t>& a, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t b = i / a.T, t = i % a.T;
    backward_row<W>(a.x + b * a.sb + t * a.st, a.g + b * a.gb + t * a.gt, a.V, a.inv_t,
                    a.labels[i], a.lse_in[i], a.ent_in ? a.ent_in[i] : acc_t(0), a.g_logp[i],
                    a.g_ent ? a.g_ent[i] : acc_t(0));
  }
}

template <typename scalar_t>
RLHF_CPU_V3 void forward_rows_v3(const Rows<scalar_t>& a, int64_t lo, int64_t hi) {
  forward_rows<8>(a, lo, hi);
}
template <typename scalar_t>
RLHF_CPU_V3 void backward_rows_v3(const Rows<scalar_t>& a, int64_t lo, int64_t hi) {
  backward_rows<8>(a, lo, hi);
}

template <typename scalar_t>
void run_rows(const Rows<scalar_t>& a, int64_t n, bool backward) {
  const bool v3 = cpu_has_v3();
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    if (backward) {
      v3 ? backward_rows_v3(a, lo, hi) : backward_rows<4>(a, lo, hi);
    } else {
      v3 ? forward_rows_v3(a, lo, hi) : forward_rows<4>(a, lo, hi);
    }
  });
}

void check_layout(const at::Tensor& logits, const at::Tensor& labels, const char* fn) {
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1, fn,
              ": logits must be [B, T, V] with a contiguous last dimension");
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) &&
                  labels.size(1) == logits.size(1) && labels.is_contiguous() &&
                  labels.scalar_type() == at::kLong,
              fn, ": labels must be contiguous int64 [B, T]");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
    bool with_entropy) {
  check_layout(logits, labels, "logprobs_fwd_cpu");
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const int64_t sb = logits.stride(0), st = logits.stride(1);
  const bool f64 = logits.scalar_type() == at::kDouble;
  auto opts = logits.options().dtype(f64 ? at::kDouble : at::kFloat);
  at::Tensor logp = at::empty({B, T}, opts), lse = at::empty({B, T}, opts);
  at::Tensor ent = with_entropy ? at::empty({B, T}, opts) : at::empty({0}, opts);
  const int64_t* y = labels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_fwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    Rows<scalar_t> a{};
    a.x = logits.data_ptr<scalar_t>();
    a.T = T, a.V = V, a.sb = sb, a.st = st, a.inv_t = inv_temperature, a.labels = y;
    a.logp = logp.data_ptr<acc_t>(), a.lse = lse.data_ptr<acc_t>();
    a.entropy = with_entropy ? ent.data_ptr<acc_t>() : nullptr;
    run_rows(a, B * T, /*backward=*/false);
  });
  return {logp, ent, lse};
}

void logprobs_bwd_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                      const c10::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                      const c10::optional<at::Tensor>& grad_entropy, double inv_temperature,
                      at::Tensor& grad_logits) {
  check_layout(logits, labels, "logprobs_bwd_cpu");
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.stride(2) == 1 &&
                  grad_logits.scalar_type() == logits.scalar_type(),
              "logprobs_bwd_cpu: grad_logits must match logits");
  const bool has_ent = grad_entropy.has_value() && grad_entropy->defined();
  TORCH_CHECK(!has_ent || (entropy.has_value() && entropy->defined()),
              "logprobs_bwd_cpu: the entropy gradient needs the saved entropy");
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const int64_t sb = logits.stride(0), st = logits.stride(1);
  const int64_t gb = grad_logits.stride(0), gt = grad_logits.stride(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lse_c = lse.contiguous().to(acc), glp = grad_logp.contiguous().to(acc);
  const at::Tensor ent_c = has_ent ? entropy->contiguous().to(acc) : at::Tensor();
  const at::Tensor gent = has_ent ? grad_entropy->contiguous().to(acc) : at::Tensor();
  const int64_t* y = labels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    Rows<scalar_t> a{};
    a.x = logits.data_ptr<scalar_t>(), a.g = grad_logits.data_ptr<scalar_t>();
    a.T = T, a.V = V, a.sb = sb, a.st = st, a.gb = gb, a.gt = gt;
    a.inv_t = inv_temperature, a.labels = y;
    a.lse_in = lse_c.data_ptr<acc_t>(), a.g_logp = glp.data_ptr<acc_t>();
    a.ent_in = has_ent ? ent_c.data_ptr<acc_t>() : nullptr;
    a.g_ent = has_ent ? gent.data_ptr<acc_t>() : nullptr;
    run_rows(a, B * T, /*backward=*/true);
  });
}
