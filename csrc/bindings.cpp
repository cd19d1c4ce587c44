// The one Python module of rlhf_kernels: a thin entry point over the CPU and CUDA sources.
#include <torch/extension.h>

#include "build_info.h"
#include "gae.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_kernels C++/CUDA kernels (use the functions of the rlhf_kernels package)";
  m.def("gae_cpu", &gae_cpu, "GAE, C++ CPU kernel", py::arg("rewards"), py::arg("values"),
        py::arg("mask"), py::arg("cu_seqlens"), py::arg("row_len"), py::arg("gamma"),
        py::arg("lam"), py::arg("skip"), py::arg("whiten"));
#ifdef RLHF_WITH_CUDA
  m.def("gae_cuda", &gae_cuda, "GAE, CUDA scan kernel", py::arg("rewards"), py::arg("values"),
        py::arg("mask"), py::arg("cu_seqlens"), py::arg("row_len"), py::arg("gamma"),
        py::arg("lam"), py::arg("skip"), py::arg("whiten"));
#endif
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
