# Serving image for Animl's classifier endpoint on SageMaker (serverless, CPU): TorchServe, with the torch and
# torchvision that traced the model (TorchScript files must be loaded by the torch that wrote them, and a
# GPU-traced file fails on CPU serverless: the deploy stage traces on CPU). SageMaker unpacks model.tar.gz (the
# .mar at its root) into /opt/ml/model and starts the container with `serve`; TorchServe loads every archive
# there and answers GET /ping and POST /invocations on port 8080.
# Build from the repository root: docker build -f docker/serving.Dockerfile -t animl-serving .
# The base image is a build argument: a mirror's copy or a locally built one works the same
# (--build-arg PYTHON_IMAGE=registry.example/python:3.11-slim-bookworm; see docs/kubeflow.md, "Images").
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH TEMP=/home/model-server/tmp
# TorchServe's front end is Java. Debian's security updates move its version: the base image tag fixes it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY pyproject.toml docker/deps.py ./
COPY requirements/constraints.txt requirements/
# The handler needs only the `serving` extra (the .mar ships the project's preprocessing code itself), pinned by
# the project's constraints, so the serving torch is the torch that traced the model.
RUN python deps.py --no-core serving > requirements.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c requirements/constraints.txt -r requirements.txt \
    && rm -rf /build
RUN groupadd --gid 10001 model-server \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/model-server model-server \
    && mkdir -p /home/model-server/tmp /opt/ml/model \
    && chown -R model-server:model-server /home/model-server
COPY docker/serving/config.properties /home/model-server/config.properties
COPY --chmod=755 docker/serving/entrypoint.sh /usr/local/bin/entrypoint.sh
WORKDIR /home/model-server
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["serve"]
