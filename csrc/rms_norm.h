// y = weight * x / sqrt(mean(x^2) + eps) over the last dimension (a Llama-style RMSNorm, as
// HF computes it in float32) for the decode loop on the CPU, where the same norm as a chain of
// ATen ops costs ~30 us per call at batch 32: one pass instead. x [..., H] float32 with a
// contiguous last dimension; weight [H] float32. Returns y with x's shape, contiguous.
#pragma once
#include <torch/extension.h>

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
