// y = x @ w^T (+ bias) for a few rows of x: the projections of one decode step (one row per
// sequence). x [M, K] float32, M <= SKINNY_MAX_ROWS; w [N, K] float32 contiguous (an
// nn.Linear weight, read in place); bias [N] float32 or None. Returns y [M, N] float32.
#pragma once
#include <torch/extension.h>

#include <vector>

constexpr int64_t SKINNY_MAX_ROWS = 8;

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& w,
                             const c10::optional<at::Tensor>& bias);

// The same for several weights [N_i, K] read by one x, in one parallel region; returns y_i.
std::vector<at::Tensor> skinny_linears_cpu(const at::Tensor& x,
                                           const std::vector<at::Tensor>& weights,
                                           const std::vector<c10::optional<at::Tensor>>& biases);
