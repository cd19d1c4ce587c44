// Decode attention and sampling on the CPU (contract in ../decode.h).
//
// Attention: one task per (sequence, KV head) runs the query heads of its group together, so
// each cached K/V row is read once per group: scores for the visible positions, softmax,
// weighted sum of V, all in float32, vectorised over the head dim (8-lane AVX2 build and a
// 4-lane baseline, vec_math.h). Sampling: one task per row; top-k through nth_element,
// top-p through a sort of the probabilities (V log V is small next to a decode step), then
// the inverse CDF of the kept tokens in index order. Non-finite z follow the rule of
// rlhf_kernels/reference/sample.py: a row holding NaN (or -inf everywhere) is marked with
// token -1 (-2) and log-prob NaN, a row holding +inf is sampled uniformly over its +inf tokens.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "../decode.h"
#include "vec_math.h"

namespace {

// Scores of one query head over the visible positions, softmax, weighted sum of V.
// float32 math; float / bf16 / fp16 caches are read W lanes at a time (D % W == 0, else
// the scalar path), float64 (tests) stays scalar.
template <int W, typename scalar_t>
RLHF_INLINE void attend_head(const scalar_t* qg, const scalar_t* k, const scalar_t* v,
                             scalar_t* out, int64_t D, int64_t lo, int64_t n, float scale,
                             float* scores, float* acc) {
  using namespace rlhf_cpu;
  constexpr bool vec = !std::is_same_v<scalar_t, double>;
  const bool lanes = vec && D % W == 0;
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < n; ++s) {
    const scalar_t* ks = k + (lo + s) * D;
    float dot = 0.f;
    if constexpr (vec) {
      if (lanes) {
        vfloat<W> d8 = {};
        for (int64_t d = 0; d < D; d += W) d8 += load_float<W>(qg + d) * load_float<W>(ks + d);
        dot = hsum<W>(d8);
      }
    }
    if (!lanes)
      for (int64_t d = 0; d < D; ++d) dot += static_cast<float>(qg[d]) * static_cast<float>(ks[d]);
    scores[s] = dot * scale;
    m = std::max(m, scores[s]);
  }
  float sum = 0.f;
  int64_t s = 0;
  if constexpr (vec) {
    vfloat<W> sums = {};
    for (; s + W <= n; s += W) {
      const vfloat<W> e = vexp<W>(vload<vfloat<W>>(scores + s) - m);
      vstore(scores + s, e);
      sums += e;
    }
    sum = hsum<W>(sums);
  }
  for (; s < n; ++s) sum += (scores[s] = std::exp(scores[s] - m));
  std::fill(acc, acc + D, 0.f);
  for (int64_t s2 = 0; s2 < n; ++s2) {
    const scalar_t* vs = v + (lo + s2) * D;
    const float p = scores[s2] / sum;
    if constexpr (vec) {
      if (lanes) {
        for (int64_t d = 0; d < D; d += W)
          vstore(acc + d, vload<vfloat<W>>(acc + d) + p * load_float<W>(vs + d));
        continue;
      }
    }
    for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(vs[d]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[d]);  // 0 if n = 0
}

// One (sequence, KV head) task: the query heads of its group over positions [lo, hi).
template <int W, typename scalar_t>
RLHF_INLINE void attend_group(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                              scalar_t* out, int64_t group, int64_t D, int64_t lo, int64_t hi,
                              float scale, float* scores, float* acc) {
  const int64_t n = std::max<int64_t>(hi - lo, 0);
  for (int64_t g = 0; g < group; ++g)
    attend_head<W>(q + g * D, k, v, out + g * D, D, lo, n, scale, scores, acc);
}

template <typename scalar_t>
RLHF_CPU_V3 void attend_group_v3(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                 scalar_t* out, int64_t group, int64_t D, int64_t lo,
                                 int64_t hi, float scale, float* scores, float* acc) {
  attend_group<8>(q, k, v, out, group, D, lo, hi, scale, scores, acc);
}

// z = x / temperature (a true division, as the contract and every other backend: a multiply by
// 1/T rounds differently and picks other tokens at ties), p = exp(z - max z) (unnormalised);
// returns the sum of p in double
// (summed per 256 logits in float lanes): the behaviour log-prob must match training's
// recompute. The exp is the sampler's cost at large V: vectorised, built per instruction set.
template <int W>
RLHF_INLINE double exp_row(const float* x, float t, float* z, float* p, int64_t V,
                           float* max_out) {
  using namespace rlhf_cpu;
  const int64_t full = V / W * W;
  vfloat<W> vmax = vsplat<W>(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < full; j += W) {
    const vfloat<W> zz = vload<vfloat<W>>(x + j) / t;
    vstore(z + j, zz);
    vmax = zz > vmax ? zz : vmax;
  }
  float m = hmax<W>(vmax);
  for (int64_t j = full; j < V; ++j) m = std::max(m, z[j] = x[j] / t);
  double sum = 0;
  vfloat<W> acc = {};
  for (int64_t j = 0; j < full; j += W) {
    const vfloat<W> e = vexp<W>(vload<vfloat<W>>(z + j) - m);
    vstore(p + j, e);
    acc += e;
    if ((j / W) % (256 / W) == 256 / W - 1) {
      sum += hsum<W>(acc);
      acc = vfloat<W>{};
    }
  }
  sum += hsum<W>(acc);
  for (int64_t j = full; j < V; ++j) sum += (p[j] = std::exp(z[j] - m));
  *max_out = m;
  return sum;
}

RLHF_CPU_V3 double exp_row_v3(const float* x, float t, float* z, float* p, int64_t V,
                              float* max_out) {
  return exp_row<8>(x, t, z, p, V, max_out);
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.is_contiguous(), what,
              " must be contiguous with the dtype of q");
}

}  // namespace

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                const c10::optional<at::Tensor>& k_new,
                                const c10::optional<at::Tensor>& v_new,
                                const c10::optional<at::Tensor>& cache_start,
                                double softmax_scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "decode_attention_cpu: q [B, Hq, D], caches [B, Hkv, S, D]");
  check_same(q, q, "q");
  check_same(k_cache, q, "k_cache");
  check_same(v_cache, q, "v_cache");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK(Hkv > 0 && D > 0, "decode_attention_cpu: need at least one KV head and D >= 1");
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D && Hq % Hkv == 0,
              "decode_attention_cpu: cache shape does not match q");
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.numel() == B,
              "decode_attention_cpu: cache_seqlens must be int32 [B]");
  const at::Tensor lens = cache_seqlens.contiguous();
  const at::Tensor starts = cache_start.has_value() ? cache_start->contiguous()
                                                    : at::zeros({B}, lens.options());
  const int32_t* len = lens.data_ptr<int32_t>();
  const int32_t* start = starts.data_ptr<int32_t>();
  const bool append = k_new.has_value() && k_new->defined();
  at::Tensor out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention_cpu", [&] {
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    if (append) {
      check_same(*k_new, q, "k_new");
      check_same(*v_new, q, "v_new");
      const scalar_t* kn = k_new->data_ptr<scalar_t>();
      const scalar_t* vn = v_new->data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(len[b] >= 0 && len[b] < S, "decode_attention_cpu: no room in the cache");
        for (int64_t h = 0; h < Hkv; ++h) {
          const int64_t dst = ((b * Hkv + h) * S + len[b]) * D, src = (b * Hkv + h) * D;
          std::copy(kn + src, kn + src + D, kc + dst);
          std::copy(vn + src, vn + src + D, vc + dst);
        }
      }
    }
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t group = Hq / Hkv;
    const bool v3 = rlhf_cpu::cpu_has_v3();
    at::parallel_for(0, B * Hkv, 1, [&](int64_t lo_task, int64_t hi_task) {
      std::vector<float> scores(S), acc(D);
      for (int64_t task = lo_task; task < hi_task; ++task) {
        const int64_t b = task / Hkv, h = task % Hkv;
        const int64_t hi = std::min<int64_t>(len[b] + (append ? 1 : 0), S);
        const int64_t lo = std::max<int64_t>(start[b], 0);
        const int64_t q_off = (b * Hq + h * group) * D, kv_off = (b * Hkv + h) * S * D;
        const float scale = static_cast<float>(softmax_scale);
        (v3 ? attend_group_v3<scalar_t> : attend_group<4, scalar_t>)(
            qp + q_off, kc + kv_off, vc + kv_off, op + q_off, group, D, lo, hi, scale,
            scores.data(), acc.data());
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits, double temperature,
                                              int64_t top_k, double top_p,
                                              const at::Tensor& uniforms) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "sample_cpu: logits [B, V] contiguous");
  TORCH_CHECK(uniforms.scalar_type() == at::kFloat && uniforms.numel() == logits.size(0),
              "sample_cpu: uniforms must be float32 [B]");
  TORCH_CHECK(temperature > 0, "sample_cpu: temperature must be > 0");
  const int64_t B = logits.size(0), V = logits.size(1);
  const at::Tensor z_all = logits.to(at::kFloat).contiguous();
  const at::Tensor u_all = uniforms.contiguous();
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logp = at::empty({B}, logits.options().dtype(at::kFloat));
  const float* zp = z_all.data_ptr<float>();
  const float* up = u_all.data_ptr<float>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = logp.data_ptr<float>();
  const float t = static_cast<float>(temperature);
  const bool v3 = rlhf_cpu::cpu_has_v3();
  constexpr float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> z(V), p(V), tmp;
    for (int64_t b = lo; b < hi; ++b) {
      float m;
      double sum = v3 ? exp_row_v3(zp + b * V, t, z.data(), p.data(), V, &m)
                      : exp_row<4>(zp + b * V, t, z.data(), p.data(), V, &m);
      // Non-finite z (the rule: rlhf_kernels/reference/sample.py). The max above skips NaN (a
      // compare with NaN is false), so NaN is looked for here: a NaN row has no distribution,
      // and the sort below would be undefined on it (its tie loop used to spin forever).
      bool has_nan = false;
      int64_t n_inf = 0;
      for (int64_t j = 0; j < V; ++j) {
        has_nan |= std::isnan(z[j]);
        n_inf += z[j] == inf;
      }
      if (has_nan || m == -inf) {  // NaN, or no NaN and no z above -inf: an error row
        tp[b] = has_nan ? -1 : -2;
        lp[b] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      if (n_inf > 0) {  // the +inf tokens share the mass: z = 0 there, -inf elsewhere
        for (int64_t j = 0; j < V; ++j) {
          const bool top = z[j] == inf;
          z[j] = top ? 0.f : -inf;
          p[j] = top ? 1.f : 0.f;
        }
        m = 0.f;
        sum = static_cast<double>(n_inf);
      }
      for (int64_t j = 0; j < V; ++j) p[j] = static_cast<float>(p[j] / sum);
      const float lse = m + static_cast<float>(std::log(sum));
      // kept: z >= z_kth (top-k, ties kept) and p >= p_min (top-p: strictly-above mass < top_p)
      float z_kth = -std::numeric_limits<float>::infinity();
      if (top_k > 0 && top_k < V) {
        tmp = z;
        std::nth_element(tmp.begin(), tmp.begin() + (top_k - 1), tmp.end(), std::greater<>());
        z_kth = tmp[top_k - 1];
      }
      float p_min = 0.f;
      if (top_p < 1.0) {
        tmp = p;
        std::sort(tmp.begin(), tmp.end(), std::greater<>());
        double above = 0;  // mass of the tokens strictly more probable than the current group
        for (int64_t i = 0; i < V;) {
          int64_t j = i;
          double group = 0;
          // do-while: each group takes at least its first element, so the walk always moves on
          do group += tmp[j++];
          while (j < V && tmp[j] == tmp[i]);
          if (above >= top_p) break;
          p_min = tmp[i];
          above += group;
          i = j;
        }
      }
      double total = 0;
      int64_t last = 0;
      // a kept token of probability 0 (underflow, or not +inf in a +inf row) is never returned
      for (int64_t j = 0; j < V; ++j)
        if (z[j] >= z_kth && p[j] >= p_min && p[j] > 0.f) total += p[j], last = j;
      const double target = static_cast<double>(up[b]) * total;
      double cum = 0;
      int64_t token = last;  // rounding at the top of the cdf: the last kept token
      for (int64_t j = 0; j < V; ++j) {
        if (!(z[j] >= z_kth && p[j] >= p_min)) continue;
        cum += p[j];
        if (cum > target) {
          token = j;
          break;
        }
      }
      tp[b] = token;
      lp[b] = z[token] - lse;
    }
  });
  return {tokens, logp};
}
