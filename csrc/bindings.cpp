// The one Python module of rlhf_kernels: a thin entry point over the CPU and CUDA sources.
#include <torch/extension.h>

#include "build_info.h"
#include "decode.h"
#include "decode_layer.h"
#include "gae.h"
#include "logprobs.h"
#include "rms_norm.h"
#include "rope.h"
#include "swiglu.h"
#include "skinny_linear.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_kernels C++/CUDA kernels (use the functions of the rlhf_kernels package)";
  // the kernels touch no Python object: other Python threads (data loaders, monitors) run
  // while they do, as they do during torch's own ops
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("gae_cpu", &gae_cpu, "GAE, C++ CPU kernel", nogil, py::arg("rewards"), py::arg("values"),
        py::arg("mask"), py::arg("cu_seqlens"), py::arg("row_len"), py::arg("gamma"),
        py::arg("lam"), py::arg("skip"), py::arg("whiten"));
  m.def("logprobs_fwd_cpu", &logprobs_fwd_cpu, "token log-probs + entropy, C++ CPU kernel",
        nogil, py::arg("logits"), py::arg("labels"), py::arg("inv_temperature"),
        py::arg("with_entropy"));
  m.def("logprobs_bwd_cpu", &logprobs_bwd_cpu, "grad of logprobs_fwd_cpu w.r.t. logits",
        nogil, py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("entropy"),
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("inv_temperature"),
        py::arg("grad_logits"));
  m.def("decode_attention_cpu", &decode_attention_cpu, "decode attention, C++ CPU kernel",
        nogil, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"),
        py::arg("k_new"), py::arg("v_new"), py::arg("cache_start"), py::arg("softmax_scale"));
  m.def("skinny_linear_cpu", &skinny_linear_cpu,
        "x @ w^T (+ bias) for <= 8 rows of x (decode-step projections), C++ CPU kernel",
        nogil, py::arg("x"), py::arg("w"), py::arg("bias") = py::none());
  m.def("rms_norm_cpu", &rms_norm_cpu,
        "weight * x / sqrt(mean(x^2) + eps) over the last dim, C++ CPU kernel",
        nogil, py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("swiglu_cpu", &swiglu_cpu, "silu(gate) * up, C++ CPU kernel", nogil, py::arg("gate"),
        py::arg("up"));
  m.def("swiglu_backward_cpu", &swiglu_backward_cpu,
        "(grad gate, grad up) of swiglu_cpu, C++ CPU kernel", nogil, py::arg("grad_y"),
        py::arg("gate"), py::arg("up"));
  m.def("rope_cpu", &rope_cpu,
        "x * cos + rotate_half(x) * sin (HF's two-halves RoPE; signed sin), C++ CPU kernel",
        nogil, py::arg("x"), py::arg("cos"), py::arg("signed_sin"));
  m.def("rms_norm_backward_cpu", &rms_norm_backward_cpu,
        "(grad x, grad weight) of rms_norm_cpu, C++ CPU kernel", nogil, py::arg("grad_y"),
        py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("llama_decode_layer_cpu", &llama_decode_layer_cpu,
        "a Llama-family decoder layer for one decode step, C++ CPU kernels", nogil,
        py::arg("h"), py::arg("norms"), py::arg("weights"), py::arg("biases"), py::arg("eps"),
        py::arg("qk_eps"), py::arg("heads"), py::arg("kv_heads"), py::arg("cos"),
        py::arg("signed_sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"),
        py::arg("cache_start"), py::arg("softmax_scale"));
  m.def("sample_cpu", &sample_cpu, "temperature / top-k / top-p sampling, C++ CPU kernel",
        nogil, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("uniforms"));
#ifdef RLHF_WITH_CUDA
  m.def("logprobs_fwd_cuda", &logprobs_fwd_cuda, "token log-probs + entropy, CUDA kernel",
        nogil, py::arg("logits"), py::arg("labels"), py::arg("inv_temperature"),
        py::arg("with_entropy"));
  m.def("logprobs_bwd_cuda", &logprobs_bwd_cuda, "grad of logprobs_fwd_cuda w.r.t. logits",
        nogil, py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("entropy"),
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("inv_temperature"),
        py::arg("grad_logits"));
  m.def("gae_cuda", &gae_cuda, "GAE, CUDA scan kernel", nogil, py::arg("rewards"),
        py::arg("values"), py::arg("mask"), py::arg("cu_seqlens"), py::arg("row_len"),
        py::arg("gamma"), py::arg("lam"), py::arg("skip"), py::arg("whiten"));
  m.def("decode_attention_cuda", &decode_attention_cuda,
        "decode attention (flash-decoding, split KV), CUDA kernel", nogil, py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("k_new"),
        py::arg("v_new"), py::arg("cache_start"), py::arg("softmax_scale"));
  m.def("sample_cuda", &sample_cuda, "temperature / top-k / top-p sampling, CUDA kernel",
        nogil, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("uniforms"));
#endif
  py::tuple head_dims(DECODE_CUDA_HEAD_DIMS.size());
  for (size_t i = 0; i < DECODE_CUDA_HEAD_DIMS.size(); ++i) head_dims[i] = DECODE_CUDA_HEAD_DIMS[i];
  m.attr("decode_cuda_head_dims") = head_dims;
  py::dict info;
  info["cuda"] = RLHF_BUILD_CUDA;
  info["cuda_reason"] = RLHF_BUILD_CUDA_REASON;
  info["cuda_archs"] = RLHF_BUILD_CUDA_ARCHS;
  info["cxx_flags"] = RLHF_BUILD_CXX_FLAGS;
  info["nvcc_flags"] = RLHF_BUILD_NVCC_FLAGS;
  info["torch"] = RLHF_BUILD_TORCH;
#ifdef _OPENMP
  info["openmp"] = _OPENMP;
#else
  info["openmp"] = 0;
#endif
  info["compiler"] = __VERSION__;
  m.attr("build_info") = info;
}
