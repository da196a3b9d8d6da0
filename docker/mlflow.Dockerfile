# MLflow tracking server for manifests/: the pinned mlflow plus what the official MLflow image lacks, boto3 (S3
# artifacts) and psycopg2 (PostgreSQL backend store); all from the `mlflow-server` extra in pyproject.toml,
# constrained by requirements/constraints.txt. Runs as an unprivileged user; configuration comes from the
# Deployment's arguments and environment (Secrets), never from the image.
# The base image is a build argument: a mirror's copy or a locally built one works the same
# (--build-arg PYTHON_IMAGE=registry.example/python:3.11-slim-bookworm; see docs/kubeflow.md, "Images").
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /build
COPY pyproject.toml docker/deps.py ./
COPY requirements/constraints.txt requirements/
RUN python deps.py --no-core mlflow-server > requirements.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c requirements/constraints.txt -r requirements.txt

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/mlflow
RUN groupadd --gid 10001 mlflow \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/mlflow --shell /usr/sbin/nologin mlflow
COPY --from=deps /opt/venv /opt/venv
RUN python -c "import mlflow.server, boto3, psycopg2"
WORKDIR /home/mlflow
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
