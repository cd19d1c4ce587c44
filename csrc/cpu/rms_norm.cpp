// RMSNorm rows on the CPU (contract in ../rms_norm.h): per row one vectorised sum of squares,
// then one scaled copy. The row loop is built for x86-64-v3 (8 lanes) and the baseline (4).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "../rms_norm.h"
#include "vec_math.h"

namespace {

using namespace rlhf_cpu;

struct Rows {
  const float* x;
  const float* w;
  float* y;
  int64_t H;
  float eps;
};

template <int W>
RLHF_INLINE void norm_rows(const Rows& a, int64_t lo, int64_t hi) {
  const int64_t H = a.H, full = H / W * W;
  for (int64_t r = lo; r < hi; ++r) {
    const float* x = a.x + r * H;
    float* y = a.y + r * H;
    vfloat<W> acc = {};
    for (int64_t i = 0; i < full; i += W) {
      const vfloat<W> v = vload<vfloat<W>>(x + i);
      acc += v * v;
    }
    float sumsq = hsum<W>(acc);
    for (int64_t i = full; i < H; ++i) sumsq += x[i] * x[i];
    const float inv = 1.f / std::sqrt(sumsq / static_cast<float>(H) + a.eps);
    for (int64_t i = 0; i < full; i += W)
      vstore(y + i, vload<vfloat<W>>(a.w + i) * (vload<vfloat<W>>(x + i) * inv));
    for (int64_t i = full; i < H; ++i) y[i] = a.w[i] * (x[i] * inv);
  }
}

RLHF_CPU_V3 void norm_rows_v3(const Rows& a, int64_t lo, int64_t hi) { norm_rows<8>(a, lo, hi); }

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "rms_norm_cpu: float32 only");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "rms_norm_cpu: x [..., H] and weight [H]");
  TORCH_CHECK(eps >= 0, "rms_norm_cpu: eps must be >= 0");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t H = xc.size(-1), rows = H ? xc.numel() / H : 0;
  const Rows a{xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), H,
               static_cast<float>(eps)};
  const bool v3 = cpu_has_v3();
  // grain: ~16K elements per task, so a decode step's few rows stay on one thread
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    v3 ? norm_rows_v3(a, lo, hi) : norm_rows<4>(a, lo, hi);
  });
  return y;
}
