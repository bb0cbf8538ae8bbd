# edgekd set-up: `make demo` runs the offline end-to-end demo, `make test` runs the test suite.
# Both create .venv and install edgekd into it on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get torch's CPU build (2.13.0) instead of a multi-GB CUDA download;
# machines with an NVIDIA driver keep pip's default (CUDA) build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
EXTRAS ?= dev,onnx,gguf
# llama-cpp-python compiles llama.cpp once (~10 min on 2 cores; pip caches the wheel afterwards).
# A portable build: no -march=native, so the cached wheel runs on any x86_64 machine.
export CMAKE_ARGS ?= -DGGML_NATIVE=off
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test install system-deps lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-$(EXTRAS): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

# Fashion-MNIST (the fashion-grid task) ships in Debian; its tests skip when it is absent.
system-deps:
	@test -d $(FASHION_MNIST) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || \
	  echo "note: $(FASHION_MNIST) missing (apt-get install dataset-fashion-mnist); fashion-grid tests will skip"

demo: install system-deps
	$(BIN)/edgekd demo

# loadgroup: tests marked xdist_group share one worker (the distributed runs share a DDP reference)
test: install system-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: install
	$(BIN)/ruff check edgekd distill export runtime profiles tests benchmarks

clean:
	rm -rf $(VENV) runs build dist *.egg-info
