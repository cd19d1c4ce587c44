// RoPE rows on the CPU (contract in ../rope.h): per token the two halves of every head are
// read once and written once; the loop is built for x86-64-v3 (8 lanes) and the baseline (4).
#include <ATen/Parallel.h>

#include <algorithm>

#include "../rope.h"
#include "vec_math.h"

namespace {

using namespace rlhf_cpu;

struct Rope {
  const float* x;
  const float* c;
  const float* s;
  float* y;
  int64_t H, D;
};

template <int W>
RLHF_INLINE void rope_rows(const Rope& a, int64_t lo, int64_t hi) {
  const int64_t D = a.D, half = D / 2, full = half / W * W;
  for (int64_t n = lo; n < hi; ++n) {
    const float *c = a.c + n * D, *s = a.s + n * D;
    for (int64_t h = 0; h < a.H; ++h) {
      const float* x = a.x + (n * a.H + h) * D;
      float* y = a.y + (n * a.H + h) * D;
      for (int64_t i = 0; i < full; i += W) {
        const vfloat<W> lo_x = vload<vfloat<W>>(x + i), hi_x = vload<vfloat<W>>(x + half + i);
        vstore(y + i, lo_x * vload<vfloat<W>>(c + i) + hi_x * vload<vfloat<W>>(s + i));
        vstore(y + half + i,
               hi_x * vload<vfloat<W>>(c + half + i) + lo_x * vload<vfloat<W>>(s + half + i));
      }
      for (int64_t i = full; i < half; ++i) {
        y[i] = x[i] * c[i] + x[half + i] * s[i];
        y[half + i] = x[half + i] * c[half + i] + x[i] * s[half + i];
      }
    }
  }
}

RLHF_CPU_V3 void rope_rows_v3(const Rope& a, int64_t lo, int64_t hi) { rope_rows<8>(a, lo, hi); }

}  // namespace

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  signed_sin.scalar_type() == at::kFloat,
              "rope_cpu: float32 only");
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "rope_cpu: x must be [N, H, D] with D even");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) &&
                  signed_sin.sizes() == cos.sizes(),
              "rope_cpu: cos and signed_sin must be [N, D] for x [N, H, D]");
  const at::Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = signed_sin.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t N = xc.size(0), H = xc.size(1), D = xc.size(2);
  const Rope a{xc.data_ptr<float>(), cc.data_ptr<float>(), sc.data_ptr<float>(),
               y.data_ptr<float>(), H, D};
  const bool v3 = cpu_has_v3();
  // ~16K elements per task: a decode step's few tokens stay on one thread
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H * D, 1));
  at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) {
    v3 ? rope_rows_v3(a, lo, hi) : rope_rows<4>(a, lo, hi);
  });
  return y;
}
