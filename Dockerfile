# syntax=docker/dockerfile:1
# The btd inference service: one container runs one server process (`python -m app`) that serves
# one GPU (or one CPU budget); more load means more replicas, not more processes per container.
#
#   GPU (default): docker build -t btd:gpu .
#   CPU:           docker build --build-arg VARIANT=cpu -t btd:cpu .
#
# The GPU image runs onnxruntime-gpu 1.31.1 from PyPI, which is built for CUDA 13.x and cuDNN 9
# (releases 1.27 and later; 1.19-1.26 were CUDA 12): CUDA 13.0.2 + cuDNN 9 come from the base
# image, TensorRT 10 (the major version ONNX Runtime's TensorRT provider links) from NVIDIA's
# index. The node needs an NVIDIA driver >= 580 and a Turing or newer GPU (compute capability 7.5+).
# The release model is baked in at /models/btd-resnet50.onnx, with its INT8 variant beside it
# (which a CPU serves by default; scripts/build-image.sh leaves it out of the GPU image); mount
# another over /models or set BTD_MODEL_PATH to serve a different one.

ARG VARIANT=gpu
ARG CPU_BASE=python:3.11.15-slim-bookworm
ARG GPU_BASE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- Python on each base (the interpreter the virtualenv is built for and run by) ----
FROM ${CPU_BASE} AS python-cpu

FROM ${GPU_BASE} AS python-gpu
# Ubuntu 24.04's Python 3.12; the patch-level wildcard keeps security updates installable.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.12=3.12.3-* python3.12-venv=3.12.3-* \
 && ln -s /usr/bin/python3.12 /usr/local/bin/python3 \
 && rm -rf /var/lib/apt/lists/*

# The stage is picked by the build argument (the bases above are pinned).
# hadolint ignore=DL3006
FROM python-${VARIANT} AS python

# ---- Build the virtualenv: pinned binary wheels only, nothing compiled ----
FROM python AS builder
ARG VARIANT
# TensorRT libraries for the GPU image (empty: CUDA provider only, a smaller image).
ARG TENSORRT_LIBS=tensorrt-cu13-libs==10.16.1.11
COPY docker/requirements-${VARIANT}.lock /tmp/requirements.lock
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --only-binary=:all: \
      -r /tmp/requirements.lock
# TensorRT's wheels are published on NVIDIA's index only; --no-deps: CUDA comes from the base image.
RUN if [ "${VARIANT}" = gpu ] && [ -n "${TENSORRT_LIBS}" ]; then \
      /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --only-binary=:all: --no-deps \
        --index-url https://pypi.nvidia.com "${TENSORRT_LIBS}" \
      && ln -s "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/tensorrt_libs" \
           /opt/venv/tensorrt_libs; \
    fi \
 && /opt/venv/bin/pip uninstall --yes --disable-pip-version-check pip

# ---- Runtime: the interpreter, the virtualenv, the service code and the model ----
FROM python AS runtime
# No package installer at run time: the official python base ships its own pip (and setuptools,
# wheel) outside the virtualenv; Debian's and Ubuntu's python3 have none, hence `|| true`.
RUN (python3 -m pip uninstall --yes --disable-pip-version-check pip setuptools wheel || true) \
 && groupadd --system --gid 10001 btd \
 && useradd --system --uid 10001 --gid btd --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin btd \
 && mkdir -p /var/cache/btd/trt /var/lib/btd \
 && chown -R btd:btd /var/cache/btd /var/lib/btd
COPY --from=builder /opt/venv /opt/venv
COPY app/ /srv/btd/app/
# The model and, when the context has it, its INT8 variant.
COPY models/ /models/
# Byte-compile now (the root filesystem is read-only at run time); let the loader find TensorRT.
RUN /opt/venv/bin/python -m compileall -q /srv/btd/app \
 && if [ -d /opt/venv/tensorrt_libs ]; then \
      echo /opt/venv/tensorrt_libs > /etc/ld.so.conf.d/btd-tensorrt.conf && ldconfig; \
    fi

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONPATH=/srv/btd \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BTD_HOST=0.0.0.0 \
    BTD_PORT=8000 \
    BTD_MODEL_PATH=/models/btd-resnet50.onnx \
    BTD_TRT_ENGINE_CACHE_DIR=/var/cache/btd/trt \
    BTD_RECORDS_DIR=/var/lib/btd

WORKDIR /srv/btd
USER 10001:10001
EXPOSE 8000
# Ready means loaded, checked and warmed up; the start period covers that (TensorRT engine
# builds take longer: Kubernetes uses its own startupProbe, see k8s/).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('BTD_PORT', '8000'), timeout=4)"]
# Exec form: python is PID 1 and receives SIGTERM itself, to drain in-flight requests.
CMD ["python", "-m", "app"]
