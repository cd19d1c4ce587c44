// GAE entry points shared by bindings.cpp and the CPU / CUDA sources.
#pragma once
#include <torch/extension.h>

#include <cmath>
#include <tuple>

// Rows are either padded ([B, T] flattened, row b = [b*T, (b+1)*T)) or packed
// (cu_seqlens [B+1] int32, row b = [cu[b], cu[b+1])).
// Returns (advantages [N] f32, returns [N] f32, bad [1] int32): bad != 0 when a valid position
// holds a non-finite reward or value; the caller turns it into a ValueError.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gae_cpu(
    const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
    const c10::optional<at::Tensor>& cu_seqlens, int64_t row_len, double gamma, double lam,
    bool skip, bool whiten);

#ifdef RLHF_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> gae_cuda(
    const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
    const c10::optional<at::Tensor>& cu_seqlens, int64_t row_len, double gamma, double lam,
    bool skip, bool whiten);
#endif

#if defined(__CUDACC__)
#define RLHF_HOST_DEVICE __host__ __device__
#else
#define RLHF_HOST_DEVICE
#endif

// Variance over fewer than two valid tokens is taken as 0 (the whitened advantage is then 0).
RLHF_HOST_DEVICE inline void gae_whiten_stats(double sum, double sumsq, double count, float* mean, float* rstd) {
  const double mu = count > 0 ? sum / count : 0.0;
  double var = count > 1 ? (sumsq - count * mu * mu) / (count - 1) : 0.0;
  if (var < 0) var = 0;  // cancellation in sumsq - n*mu^2
  *mean = static_cast<float>(mu);
  *rstd = static_cast<float>(1.0 / sqrt(var + 1e-8));
}
