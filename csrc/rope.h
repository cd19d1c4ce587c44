// Rotary position embedding in the two-halves convention of Hugging Face's Llama family, on
// the CPU: y = x * cos + rotate_half(x) * sin, i.e. with D = 2h and s = [-sin_lo, sin_hi]
// (a "signed" sin, as the adapters build it), y[i] = x[i] cos[i] + x[(i + h) mod D] s[i].
// torch runs this as roll + 2 multiplies + add per tensor (~8 autograd nodes for q and k in
// training); one pass here. Its gradient is the same map with -s (a rotation by -theta).
// x [N, H, D] float32 (N = batch * tokens, H heads); cos, signed_sin [N, D] float32.
// Returns y [N, H, D], contiguous.
#pragma once
#include <torch/extension.h>

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin);
