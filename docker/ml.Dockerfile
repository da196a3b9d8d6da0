# CUDA image: train, evaluate, register (and detection). torch from the registry carries the CUDA runtime
# libraries (cuda-toolkit 13 in requirements/constraints.txt), so a slim Python base is enough; the GPU node
# supplies the driver (NVIDIA driver 580 or newer for CUDA 13) through the NVIDIA container toolkit.
# It runs on CPU nodes too (evaluate, register). No NVIDIA_VISIBLE_DEVICES here: the device plugin sets it to the
# GPUs the scheduler gave the pod, and an image default of `all` would hand a pod without a GPU limit every GPU.
# Build from the repository root: `make images` (or docker build -f docker/ml.Dockerfile .).
# The base image is a build argument: a mirror's copy or a locally built one works the same
# (--build-arg PYTHON_IMAGE=registry.example/python:3.11-slim-bookworm; see docs/kubeflow.md, "Images").
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# 1. Dependencies only, from pyproject's pins constrained by requirements/constraints.txt. This layer changes
#    only when the pins do, so a code change rebuilds and pushes just the small package layer below.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /build
COPY pyproject.toml docker/deps.py ./
COPY requirements/constraints.txt requirements/
RUN python deps.py --gpu ml > requirements.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c requirements/constraints.txt -r requirements.txt

# 2. The package itself, as a wheel.
FROM deps AS package
# The crop stage's partial JPEG decoder (src/animl_retrain/vision/_jpegcrop.c) is built against libjpeg-turbo.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libjpeg62-turbo-dev \
    && rm -rf /var/lib/apt/lists/*
COPY README.md ./
COPY src/ src/
COPY components/ components/
COPY pipelines/ pipelines/
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# 3. The runtime image: the virtualenv, the package, an unprivileged user; no compilers, caches or secrets.
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/animl \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjpeg62-turbo \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 animl \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/animl --shell /usr/sbin/nologin animl
COPY --from=deps /opt/venv /opt/venv
RUN --mount=type=bind,from=package,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps /wheels/*.whl \
    && python -c "import kfp, mlflow, torch, torchvision, animl_retrain.stages.train, animl_retrain.mlflow_model, animl_retrain.vision._jpegcrop"
WORKDIR /home/animl
USER 10001:10001
