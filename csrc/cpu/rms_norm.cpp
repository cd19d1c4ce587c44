// RMSNorm rows on the CPU (contract in ../rms_norm.h): per row one vectorised sum of squares,
// then one scaled copy; the backward adds one pass for mean(g n) and one for dx and the
// per-thread partial dweight. The row loops are built for x86-64-v3 (8 lanes) and the
// baseline (4).
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
RLHF_INLINE float inv_rms(const float* x, int64_t H, float eps) {
  const int64_t full = H / W * W;
  vfloat<W> acc = {};
  for (int64_t i = 0; i < full; i += W) {
    const vfloat<W> v = vload<vfloat<W>>(x + i);
    acc += v * v;
  }
  float sumsq = hsum<W>(acc);
  for (int64_t i = full; i < H; ++i) sumsq += x[i] * x[i];
  return 1.f / std::sqrt(sumsq / static_cast<float>(H) + eps);
}

template <int W>
RLHF_INLINE void norm_rows(const Rows& a, int64_t lo, int64_t hi) {
  const int64_t H = a.H, full = H / W * W;
  for (int64_t r = lo; r < hi; ++r) {
    const float* x = a.x + r * H;
    float* y = a.y + r * H;
    const float inv = inv_rms<W>(x, H, a.eps);
    for (int64_t i = 0; i < full; i += W)
      vstore(y + i, vload<vfloat<W>>(a.w + i) * (vload<vfloat<W>>(x + i) * inv));
    for (int64_t i = full; i < H; ++i) y[i] = a.w[i] * (x[i] * inv);
  }
}

struct GradRows {
  const float* dy;
  const float* x;
  const float* w;
  float* dx;
  float* dw;  // this task's partial sum [H]
  int64_t H;
  float eps;
};

template <int W>
RLHF_INLINE void grad_rows(const GradRows& a, int64_t lo, int64_t hi) {
  const int64_t H = a.H, full = H / W * W;
  for (int64_t r = lo; r < hi; ++r) {
    const float *x = a.x + r * H, *dy = a.dy + r * H;
    float* dx = a.dx + r * H;
    const float inv = inv_rms<W>(x, H, a.eps);
    vfloat<W> acc = {};  // sum of g n
    for (int64_t i = 0; i < full; i += W) {
      const vfloat<W> n = vload<vfloat<W>>(x + i) * inv, d = vload<vfloat<W>>(dy + i);
      acc += d * vload<vfloat<W>>(a.w + i) * n;
      vstore(a.dw + i, vload<vfloat<W>>(a.dw + i) + d * n);
    }
    float dot = hsum<W>(acc);
    for (int64_t i = full; i < H; ++i) {
      const float n = x[i] * inv;
      dot += dy[i] * a.w[i] * n;
      a.dw[i] += dy[i] * n;
    }
    const float c = dot / static_cast<float>(H);
    for (int64_t i = 0; i < full; i += W) {
      const vfloat<W> n = vload<vfloat<W>>(x + i) * inv;
      const vfloat<W> g = vload<vfloat<W>>(dy + i) * vload<vfloat<W>>(a.w + i);
      vstore(dx + i, (g - n * c) * inv);
    }
    for (int64_t i = full; i < H; ++i) dx[i] = (dy[i] * a.w[i] - x[i] * inv * c) * inv;
  }
}

RLHF_CPU_V3 void norm_rows_v3(const Rows& a, int64_t lo, int64_t hi) { norm_rows<8>(a, lo, hi); }
RLHF_CPU_V3 void grad_rows_v3(const GradRows& a, int64_t lo, int64_t hi) {
  grad_rows<8>(a, lo, hi);
}

void check(const at::Tensor& x, const at::Tensor& weight, double eps, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, name,
              ": float32 only");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), name,
              ": x [..., H] and weight [H]");
  TORCH_CHECK(eps >= 0, name, ": eps must be >= 0");
}

// ~16K elements per task, so a decode step's few rows stay on one thread
int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(x, weight, eps, "rms_norm_cpu");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t H = xc.size(-1), rows = H ? xc.numel() / H : 0;
  const Rows a{xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), H,
               static_cast<float>(eps)};
  const bool v3 = cpu_has_v3();
  at::parallel_for(0, rows, grain_rows(H), [&](int64_t lo, int64_t hi) {
    v3 ? norm_rows_v3(a, lo, hi) : norm_rows<4>(a, lo, hi);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight, double eps) {
  check(x, weight, eps, "rms_norm_backward_cpu");
  TORCH_CHECK(grad_y.scalar_type() == at::kFloat && grad_y.sizes() == x.sizes(),
              "rms_norm_backward_cpu: grad_y must be float32 with x's shape");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), dyc = grad_y.contiguous();
  at::Tensor dx = at::empty_like(xc);
  const int64_t H = xc.size(-1), rows = H ? xc.numel() / H : 0;
  // one partial dweight per task: no atomics, and a sum order fixed by the row split
  const int64_t grain = grain_rows(H), tasks = std::max<int64_t>(1, (rows + grain - 1) / grain);
  at::Tensor partial = at::zeros({tasks, H}, xc.options());
  const bool v3 = cpu_has_v3();
  at::parallel_for(0, tasks, 1, [&](int64_t t_lo, int64_t t_hi) {
    for (int64_t t = t_lo; t < t_hi; ++t) {
      const GradRows a{dyc.data_ptr<float>(), xc.data_ptr<float>(), wc.data_ptr<float>(),
                       dx.data_ptr<float>(), partial.data_ptr<float>() + t * H, H,
                       static_cast<float>(eps)};
      const int64_t lo = t * grain, hi = std::min(rows, lo + grain);
      v3 ? grad_rows_v3(a, lo, hi) : grad_rows<4>(a, lo, hi);
    }
  });
  return {dx, tasks == 1 ? partial[0] : partial.sum(0)};
}
