// silu(gate) * up and its gradients on the CPU (contract in ../swiglu.h), elementwise with the
// vectorised exp of vec_math.h; built for x86-64-v3 (8 lanes) and the baseline (4).
#include <ATen/Parallel.h>

#include <cmath>

#include "../swiglu.h"
#include "vec_math.h"

namespace {

using namespace rlhf_cpu;

struct Args {
  const float* dy;  // null in the forward
  const float* g;
  const float* u;
  float* out0;  // y, or d gate
  float* out1;  // d up (backward)
};

template <int W>
RLHF_INLINE vfloat<W> sigmoid(vfloat<W> g) {
  return 1.f / (1.f + vexp<W>(-g));
}

inline float sigmoid1(float g) { return 1.f / (1.f + std::exp(-g)); }

template <int W>
RLHF_INLINE void forward(const Args& a, int64_t lo, int64_t hi) {
  int64_t i = lo;
  for (; i + W <= hi; i += W) {
    const vfloat<W> g = vload<vfloat<W>>(a.g + i);
    vstore(a.out0 + i, g * sigmoid<W>(g) * vload<vfloat<W>>(a.u + i));
  }
  for (; i < hi; ++i) a.out0[i] = a.g[i] * sigmoid1(a.g[i]) * a.u[i];
}

template <int W>
RLHF_INLINE void backward(const Args& a, int64_t lo, int64_t hi) {
  int64_t i = lo;
  for (; i + W <= hi; i += W) {
    const vfloat<W> g = vload<vfloat<W>>(a.g + i), dy = vload<vfloat<W>>(a.dy + i);
    const vfloat<W> s = sigmoid<W>(g);
    vstore(a.out0 + i, dy * vload<vfloat<W>>(a.u + i) * s * (1.f + g * (1.f - s)));
    vstore(a.out1 + i, dy * g * s);
  }
  for (; i < hi; ++i) {
    const float g = a.g[i], s = sigmoid1(g);
    a.out0[i] = a.dy[i] * a.u[i] * s * (1.f + g * (1.f - s));
    a.out1[i] = a.dy[i] * g * s;
  }
}

RLHF_CPU_V3 void forward_v3(const Args& a, int64_t lo, int64_t hi) { forward<8>(a, lo, hi); }
RLHF_CPU_V3 void backward_v3(const Args& a, int64_t lo, int64_t hi) { backward<8>(a, lo, hi); }

void check(const at::Tensor& gate, const at::Tensor& up, const char* name) {
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat, name,
              ": float32 only");
  TORCH_CHECK(gate.sizes() == up.sizes(), name, ": gate and up must have the same shape");
}

constexpr int64_t kGrain = 16384;  // elements per task: a decode step stays on one thread

}  // namespace

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check(gate, up, "swiglu_cpu");
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor y = at::empty_like(g);
  const Args a{nullptr, g.data_ptr<float>(), u.data_ptr<float>(), y.data_ptr<float>(), nullptr};
  const bool v3 = cpu_has_v3();
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t lo, int64_t hi) {
    v3 ? forward_v3(a, lo, hi) : forward<4>(a, lo, hi);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_y,
                                                       const at::Tensor& gate,
                                                       const at::Tensor& up) {
  check(gate, up, "swiglu_backward_cpu");
  TORCH_CHECK(grad_y.scalar_type() == at::kFloat && grad_y.sizes() == gate.sizes(),
              "swiglu_backward_cpu: grad_y must be float32 with gate's shape");
  const at::Tensor g = gate.contiguous(), u = up.contiguous(), dy = grad_y.contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  const Args a{dy.data_ptr<float>(), g.data_ptr<float>(), u.data_ptr<float>(),
               dg.data_ptr<float>(), du.data_ptr<float>()};
  const bool v3 = cpu_has_v3();
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t lo, int64_t hi) {
    v3 ? backward_v3(a, lo, hi) : backward<4>(a, lo, hi);
  });
  return {dg, du};
}
