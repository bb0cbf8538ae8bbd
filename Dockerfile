# edgekd on an x86_64 CUDA machine. The Jetson (L4T / JetPack) variant and the GPU runtime
# extras are added with the runtime stage; this image runs distillation and ONNX export.
# Build: docker build -t edgekd .
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/edgekd
COPY pyproject.toml README.md ./
COPY edgekd ./edgekd
COPY distill ./distill
COPY export ./export
COPY runtime ./runtime
COPY profiles ./profiles

# The base image's CUDA build of torch satisfies edgekd's torch requirement and is kept.
# DL3013: this installs the local project, whose dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN python -m pip install ".[data,onnx,plot]"

WORKDIR /work
ENTRYPOINT ["edgekd"]
CMD ["--help"]
