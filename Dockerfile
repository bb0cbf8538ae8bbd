# edgekd images: distil, export and bench on an x86_64 CUDA machine or on an NVIDIA Jetson.
#
#   x86_64 + CUDA (default):  docker build -t edgekd:cuda .
#   Jetson Orin, JetPack 6:   docker build --build-arg PLATFORM=jetson -t edgekd:jetson .
#
# PLATFORM picks one of the two base stages below; BuildKit builds only the stage it needs.
# Both get the GPU runtimes edgekd benchmarks: onnxruntime-gpu, llama-cpp-python compiled with
# CUDA, and TensorRT's Python bindings from the base image (never pip-installed: NVIDIA's own
# builds match the image's CUDA, and the PyPI wheels fetch their libraries from NVIDIA's index).
# These images are linted (tests/test_dockerfile.py), not built or run in edgekd's CI.

ARG PLATFORM=x86_64
# NGC PyTorch 25.01: Ubuntu 24.04, Python 3.12, CUDA 12.8 with nvcc (llama.cpp's CUDA backend
# compiles against it), cuDNN 9, a CUDA build of torch and TensorRT 10.8 with Python bindings
# (the last step of the build checks for them).
ARG X86_64_BASE=nvcr.io/nvidia/pytorch:25.01-py3
# L4T JetPack r36.4 (JetPack 6.1): Ubuntu 22.04, Python 3.10, CUDA 12.6, cuDNN 9, TensorRT 10.3
# with Python bindings (checked at the end of the build as well); no torch.
ARG JETSON_BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0

# ---------------------------------------------------------------------------------------------
FROM ${X86_64_BASE} AS base-x86_64

# GPUs of the shipped device profiles: A100 (8.0), RTX 30xx/A10 (8.6), RTX 4090/L4 (8.9), H100 (9.0).
ARG CUDA_ARCHITECTURES="80;86;89;90"
ENV CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=off -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}"

# onnxruntime-gpu's PyPI wheels for x86_64 are built for CUDA 12 and cuDNN 9, as in the base.
# The base image's torch is kept: it satisfies edgekd's torch>=2.4 and pip leaves it alone.
# pynvml (bench's GPU power meter) is added from nvidia-ml-py unless the base already has it.
# DL3013: left unpinned so that pip picks the release that matches the base image's Python.
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir onnxruntime-gpu \
    && { python3 -c "import pynvml" 2>/dev/null || python3 -m pip install --no-cache-dir nvidia-ml-py; }

# ---------------------------------------------------------------------------------------------
FROM ${JETSON_BASE} AS base-jetson

# NVIDIA's Jetson AI Lab index carries aarch64 CUDA builds of torch and onnxruntime-gpu for each
# JetPack/CUDA line (PyPI has none for Jetson). It has moved before (pypi.jetson-ai-lab.dev ->
# .io); override it when it moves again, and pick jp6/cu126 for JetPack 6.x.
ARG JETSON_PIP_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
# cuSPARSELt is linked by the Jetson torch builds and is not part of JetPack 6.
ARG CUSPARSELT_URL=https://developer.download.nvidia.com/compute/cusparselt/redist/libcusparse_lt/linux-aarch64/libcusparse_lt-linux-aarch64-0.7.1.0-archive.tar.xz
# Orin (AGX, NX, Nano) is compute capability 8.7.
ARG CUDA_ARCHITECTURES=87
ENV PATH=/usr/local/cuda/bin:${PATH} \
    CUDACXX=/usr/local/cuda/bin/nvcc \
    CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=off -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DL3008: apt versions follow the L4T release of the base tag; pinning them would break on every
# JetPack point release without making the image more reproducible than the base tag already is.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential ca-certificates curl libopenblas-dev python3-dev python3-pip xz-utils \
    && rm -rf /var/lib/apt/lists/*

RUN mkdir -p /tmp/cusparselt \
    && curl -fsSL "${CUSPARSELT_URL}" | tar -xJ --strip-components=1 -C /tmp/cusparselt \
    && cp -P /tmp/cusparselt/lib/libcusparseLt.so* /usr/local/cuda/targets/aarch64-linux/lib/ \
    && echo /usr/local/cuda/targets/aarch64-linux/lib > /etc/ld.so.conf.d/cusparselt.conf \
    && ldconfig \
    && rm -rf /tmp/cusparselt

# torch and onnxruntime-gpu come from the Jetson index alone, so that no PyPI build (CPU-only, or
# built for server aarch64) can take their place; their own dependencies (numpy, sympy, ...) are
# ordinary packages that the edgekd install below resolves from PyPI, which finds both satisfied.
# DL3013: the Jetson index keeps one build per package and CUDA line and drops old ones, so a
# pinned version stops resolving there; the JetPack tag of the base is what pins this stack.
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir --no-deps --index-url "${JETSON_PIP_INDEX}" \
        torch onnxruntime-gpu

# ---------------------------------------------------------------------------------------------
# DL3006: base-${PLATFORM} is one of the stages above, not a registry image to tag.
# hadolint ignore=DL3006
FROM base-${PLATFORM} AS edgekd

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/edgekd
COPY pyproject.toml README.md ./
COPY edgekd ./edgekd
COPY distill ./distill
COPY export ./export
COPY runtime ./runtime
COPY profiles ./profiles
COPY plan ./plan

# llama-cpp-python is compiled first, from its release sdist with the llava graph's class-token
# fix applied (runtime/llama_source.py, as the Makefile does; CLIP and DINOv2 mmproj files need
# it), with CMAKE_ARGS above (GGML_CUDA); the linker flag lets its tools link against the CUDA
# driver stub, since no driver is mounted during docker build.
ARG LLAMA_CPP_VERSION=0.3.36
RUN python3 -m pip download --no-cache-dir --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==${LLAMA_CPP_VERSION}" -d /tmp/llama \
    && python3 runtime/llama_source.py \
        "/tmp/llama/llama_cpp_python-${LLAMA_CPP_VERSION}.tar.gz" /tmp/llama \
    && CMAKE_ARGS="${CMAKE_ARGS} -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined" \
        python3 -m pip install --no-cache-dir "/tmp/llama/llama_cpp_python-${LLAMA_CPP_VERSION}" \
    && rm -rf /tmp/llama

# onnx-gpu is the onnx extra with onnxruntime-gpu in place of onnxruntime (both write the same
# package: install exactly one). gguf keeps the llama-cpp-python built above. polygraphy is the tensorrt extra without tensorrt itself,
# which comes from the base image.
# The check after it fails the build, not the first benchmark, when a GPU runtime is missing or
# the CPU onnxruntime slipped in; it reads metadata and files only (no GPU during docker build).
# DL3013: this installs the local project, whose dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir ".[data,onnx-gpu,gguf,plot]" "polygraphy>=0.49" \
    && python3 -c "import importlib.metadata as md, importlib.util as u, pathlib as p; \
        libs = lambda m: list(p.Path(u.find_spec(m).origin).parent.joinpath('lib').iterdir()); \
        assert u.find_spec('tensorrt'), 'tensorrt bindings missing from the base image'; \
        assert any('libtorch_cuda' in f.name for f in libs('torch')), 'torch is a CPU build'; \
        assert any('libggml-cuda' in f.name for f in libs('llama_cpp')), 'llama.cpp lacks CUDA'; \
        md.version('onnxruntime-gpu'); \
        assert not [d for d in md.distributions() if d.metadata['Name'] == 'onnxruntime'], \
            'the CPU onnxruntime package is installed next to onnxruntime-gpu'"

WORKDIR /work
ENTRYPOINT ["edgekd"]
CMD ["--help"]
