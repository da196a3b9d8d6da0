"""The containerised end-to-end run (``make test-images``): build the CPU and ML images, run the demo in them.

kfp.local's DockerRunner runs every task in the image its component names, as the image's non-root user, on the
host network (so the embedded SeaweedFS and MLflow stay on loopback), with their environment passed in the way
a cluster's Secrets would. The checks are the subprocess run's: every stage's report, a registered champion, and
no credential in any log or file. Slow (image builds): not part of ``make test``.

Docker comes from ``DOCKER`` (a client with BuildKit), the base image from ``PYTHON_IMAGE`` (default: the
Dockerfiles' own); see docs/kubeflow.md, "Images".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from animl_retrain.components.container_images import CPU_IMAGE, ML_IMAGE

from animl_retrain.tools import demo
from animl_retrain.tools.local_run import run_local
from tests.test_pipeline import STAGES, mlflow_texts

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.pipeline]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_UID = 10001  # USER in docker/cpu.Dockerfile and docker/ml.Dockerfile


def docker() -> str:
    found = shutil.which(os.environ.get("DOCKER") or "docker")
    ok = found and subprocess.run([found, "info"], capture_output=True, timeout=60).returncode == 0
    if not ok:
        message = f"make test-images needs a running Docker engine and its client ({found or 'docker'} not usable)"
        if os.environ.get("ANIML_TEST_IMAGES"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def build(client: str, dockerfile: str, tag: str) -> float:
    """Build one image from the repository, the way `make images` does (plus host networking for pip)."""
    args = [client, "build", "--network", "host", "-f", f"docker/{dockerfile}", "-t", tag]
    if os.environ.get("PYTHON_IMAGE"):
        args += ["--build-arg", f"PYTHON_IMAGE={os.environ['PYTHON_IMAGE']}"]
    start = time.perf_counter()
    proc = subprocess.run(
        [*args, "."], cwd=ROOT, env=os.environ | {"DOCKER_BUILDKIT": "1"}, capture_output=True, text=True, timeout=3000
    )
    assert proc.returncode == 0, f"{dockerfile} did not build:\n{proc.stderr[-4000:]}"
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def images():
    """Build both images; return each build's seconds."""
    client = docker()
    return {kind: build(client, f"{kind}.Dockerfile", image) for kind, image in (("cpu", CPU_IMAGE), ("ml", ML_IMAGE))}


@pytest.mark.timeout(3600)
def test_the_demo_pipeline_runs_in_the_images(images, servers, tmp_path, capfd):
    import kfp.local

    from animl_retrain.core.storage import s3_client
    from animl_retrain.tools import services

    client = s3_client()
    for bucket in ("img-images", "img-exports"):
        client.create_bucket(Bucket=bucket)
    demo.generate(
        "s3://img-images", "s3://img-exports/export.json", "s3://img-exports/spec.json", n_images=96, n_locations=8
    )
    params = {
        "export_uri": "s3://img-exports/export.json",
        "images_uri": "s3://img-images",
        "label_spec": "s3://img-exports/spec.json",
        "model_name": "img-model",
        "experiment": "img",
        "arch": "mobilenet_v3_small",
        "image_size": 32,
        "epochs": 2,
        "batch_size": 16,
        "split_trials": 500,
        "min_locs": 2,
    }
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o777)  # the tasks write as the images' user, not as this test's
    runner = kfp.local.DockerRunner(network_mode="host", environment=services.client_env(servers))
    start = time.perf_counter()
    summary = run_local(params, root, runner=runner)
    seconds = time.perf_counter() - start

    assert list(summary["stages"]) == STAGES
    assert summary["stages"]["register"]["promoted"] is True
    assert all(not report.get("problem_counts", {}).get("error") for report in summary["stages"].values())
    written = [p for p in root.rglob("*") if p.is_file() and "-op" in str(p.relative_to(root))]
    assert written and {p.stat().st_uid for p in written} == {IMAGE_UID}, "tasks did not run as the images' user"
    import mlflow

    version = mlflow.MlflowClient().get_model_version_by_alias("img-model", "champion")
    assert version.version == "1"

    logs = capfd.readouterr()
    assert f"Found image {CPU_IMAGE!r}" in logs.out and f"Found image {ML_IMAGE!r}" in logs.out  # nothing pulled
    haystacks = {"stdout": logs.out, "stderr": logs.err}
    haystacks |= {str(p): p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file()}
    haystacks |= {f"MLflow: {where}": text for where, text in mlflow_texts()}
    leaks = [where for where, text in haystacks.items() if servers.secret_key in text]
    assert not leaks, f"the S3 secret key appears in {leaks}"
    # Shown by `make test-images` (pytest -rP): the figures docs/kubeflow.md records.
    print(f"image builds: cpu {images['cpu']:.0f} s, ml {images['ml']:.0f} s; pipeline in the images: {seconds:.0f} s")
