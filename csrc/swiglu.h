// The gated MLP activation of Llama-family models on the CPU: y = silu(gate) * up with
// silu(g) = g * sigmoid(g). torch runs it as two ops forward and three backward (silu, mul;
// silu_backward, two muls); one pass each way here. gate, up: float32, the same shape.
// Backward: with s = sigmoid(g),  d gate = dy * up * s * (1 + g (1 - s)),  d up = dy * g * s.
#pragma once
#include <torch/extension.h>

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_y,
                                                       const at::Tensor& gate,
                                                       const at::Tensor& up);
