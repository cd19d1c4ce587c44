// Decode-step projections on the CPU (contract in csrc/skinny_linear.h).
//
// With M <= 8 rows of x a GEMM is a weight stream with little reuse, where a general GEMM
// spends its time packing and synchronising. Here x is transposed once into xt [K, 8] (one
// 8-lane vector per k, zero lanes past M, ~K * 32 bytes: L1/L2 resident) and every weight
// element is broadcast against it: acc[n] += w[n, k] * xt[k], 8 rows of w per tile so that one
// load of xt[k] feeds 8 FMAs. Lane m of acc[n] is y[m, n]; the sum over k runs in order.
// Threads split the rows of w. Built for x86-64-v3 (AVX2 + FMA) and the baseline, picked at
// run time with the other CPU kernels' switch (cpu_has_v3 in vec_math.h).
//
// Why the prefetch: a tile reads 8 rows of w at once, 8 interleaved streams of 4 bytes per k,
// which the hardware prefetchers follow poorly; the loop then waits on DRAM at ~14 GB/s on 2
// Zen 3 cores where a plain sum streams ~27 GB/s. While computing one tile the loop asks for
// the next tile's lines (one contiguous block of 8 * K floats), spread over its k steps:
// ~17-18 GB/s (benchmarks/bench_generation.py shows the decode step it buys). The arithmetic
// is unchanged.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../skinny_linear.h"
#include "vec_math.h"

namespace {

using rlhf_cpu::vfloat;
using rlhf_cpu::vload;

// 8 lanes = the 8 rows of x in both builds (the baseline splits them over two SSE registers)
constexpr int64_t kLine = 64 / sizeof(float);  // floats per cache line

// acc[r] += w[n0 + r, k] * xt[k] for k in order; meanwhile the cache lines [next, next_end)
// are prefetched, R of them per 16 k steps (R rows of K floats = R * K / 16 lines)
template <int R>
RLHF_INLINE void tile(const float* xt, int64_t K, const float* w, float* y, int64_t M, int64_t N,
                      int64_t n0, const float* next, const float* next_end) {
  vfloat<8> acc[R] = {};
  int64_t k = 0;
  for (; k + kLine <= K; k += kLine) {
    for (int i = 0; i < R && next < next_end; ++i, next += kLine) __builtin_prefetch(next, 0, 3);
    for (int64_t j = k; j < k + kLine; ++j) {
      const vfloat<8> xv = vload<vfloat<8>>(xt + j * 8);
      for (int r = 0; r < R; ++r) acc[r] += w[(n0 + r) * K + j] * xv;
    }
  }
  for (; k < K; ++k) {
    const vfloat<8> xv = vload<vfloat<8>>(xt + k * 8);
    for (int r = 0; r < R; ++r) acc[r] += w[(n0 + r) * K + k] * xv;
  }
  for (int r = 0; r < R; ++r)
    for (int64_t m = 0; m < M; ++m) y[m * N + n0 + r] = acc[r][m];
}

RLHF_INLINE void skinny_block(const float* xt, int64_t K, const float* w, float* y, int64_t M,
                              int64_t N, int64_t lo, int64_t hi) {
  int64_t n = lo;
  // the next tile of this task's rows: rows [n + 8, min(n + 16, hi))
  for (; n + 8 <= hi; n += 8)
    tile<8>(xt, K, w, y, M, N, n, w + (n + 8) * K, w + std::min(n + 16, hi) * K);
  for (; n < hi; ++n) tile<1>(xt, K, w, y, M, N, n, nullptr, nullptr);
}

RLHF_CPU_V3 void skinny_block_v3(const float* xt, int64_t K, const float* w, float* y, int64_t M,
                                 int64_t N, int64_t lo, int64_t hi) {
  skinny_block(xt, K, w, y, M, N, lo, hi);
}

void skinny_block_baseline(const float* xt, int64_t K, const float* w, float* y, int64_t M,
                           int64_t N, int64_t lo, int64_t hi) {
  skinny_block(xt, K, w, y, M, N, lo, hi);
}

}  // namespace

std::vector<at::Tensor> skinny_linears_cpu(const at::Tensor& x,
                                           const std::vector<at::Tensor>& weights,
                                           const std::vector<c10::optional<at::Tensor>>& biases) {
  TORCH_CHECK(x.dim() == 2, "skinny_linear_cpu: x [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "skinny_linear_cpu: float32 only");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= SKINNY_MAX_ROWS, "skinny_linear_cpu: 1 to ",
              SKINNY_MAX_ROWS, " rows of x");
  TORCH_CHECK(!weights.empty() && biases.size() == weights.size(),
              "skinny_linear_cpu: one bias (or None) per weight");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  std::vector<at::Tensor> ws, ys;
  // the weights' 8-row tiles in one index space: tile t of weight i is first[i] + t
  std::vector<int64_t> first{0};
  for (const at::Tensor& w : weights) {
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K, "skinny_linear_cpu: x [M, K] and w [N, K]");
    TORCH_CHECK(w.scalar_type() == at::kFloat, "skinny_linear_cpu: float32 only");
    ws.push_back(w.contiguous());
    ys.push_back(at::empty({M, w.size(0)}, xc.options()));
    first.push_back(first.back() + (w.size(0) + 7) / 8);
  }
  // xt [K, 8]: x transposed, lanes past M zero (built here: a few KB, no ATen op per call)
  std::vector<float> xt(K * 8, 0.f);
  const float* xsrc = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xt[k * 8 + m] = xsrc[m * K + k];
  const float* xp = xt.data();
  // grain: enough tiles that a task streams >= 64 KB of weights
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(K, 1));
  const auto block = rlhf_cpu::cpu_has_v3() ? skinny_block_v3 : skinny_block_baseline;
  // one parallel region for all the weights (a decode step's q / k / v read one x): a task's
  // tiles may span two weights
  at::parallel_for(0, first.back(), grain, [&](int64_t lo, int64_t hi) {
    for (size_t i = 0; i < ws.size(); ++i) {
      const int64_t a = std::max(lo, first[i]), b = std::min(hi, first[i + 1]);
      if (a >= b) continue;
      const int64_t N = ws[i].size(0);
      block(xp, K, ws[i].data_ptr<float>(), ys[i].data_ptr<float>(), M, N, (a - first[i]) * 8,
            std::min((b - first[i]) * 8, N));
    }
  });
  for (size_t i = 0; i < ws.size(); ++i) {
    const c10::optional<at::Tensor>& bias = biases[i];
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == ws[i].size(0),
                  "skinny_linear_cpu: bias [N] float32");
      ys[i].add_(*bias);
    }
  }
  return ys;
}

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& w,
                             const c10::optional<at::Tensor>& bias) {
  return skinny_linears_cpu(x, {w}, {bias})[0];
}
