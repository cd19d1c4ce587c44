// y = weight * x / sqrt(mean(x^2) + eps) over the last dimension (a Llama-style RMSNorm, as
// HF computes it in float32) on the CPU, where torch runs the same norm as a chain of ATen ops
// (~30 us per call at decode sizes; in training ~16 autograd nodes per norm, forward and
// backward): one pass instead. x [..., H] float32 with a contiguous last dimension; weight [H]
// float32. Returns y with x's shape, contiguous.
#pragma once
#include <torch/extension.h>

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);

// The gradients of rms_norm_cpu: with r = 1/sqrt(mean(x^2) + eps), n = x r and g = dy weight,
//   dx = r (g - n mean(g n)),   dweight = sum over rows of dy n.
// r is recomputed per row (one pass over x) rather than saved by the forward. dy, x [..., H]
// float32; returns (dx with x's shape, dweight [H]).
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight, double eps);
