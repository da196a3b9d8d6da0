"""The container images as far as they can be checked without a Docker engine (hadolint runs in `make lint`).

The pins an image installs are the project's pins, the build context holds only what the builds copy, the images
run as an unprivileged user, and `make images` builds and pushes exactly the images the pipeline names.
"""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
sys.path.insert(0, str(ROOT / "docker"))
import deps  # noqa: E402  (docker/deps.py: the requirement lines the images install)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    lines = (ROOT / "requirements/constraints.txt").read_text().splitlines()
    return {norm(n): v for n, _, v in (line.partition("==") for line in lines if "==" in line)}


def deps_args(dockerfile: Path) -> list[str]:
    [args] = re.findall(r"python deps\.py ?([^>]*)>", dockerfile.read_text())
    return args.split()


def test_there_is_a_cpu_an_ml_an_mlflow_and_a_serving_image():
    assert [p.name for p in DOCKERFILES] == [
        "cpu.Dockerfile",
        "ml.Dockerfile",
        "mlflow.Dockerfile",
        "serving.Dockerfile",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_images_install_the_projects_own_pins(dockerfile):
    text = dockerfile.read_text()
    args = deps_args(dockerfile)
    lines = deps.requirements(
        ROOT / "pyproject.toml", [a for a in args if not a.startswith("--")], "--no-core" not in args, "--gpu" in args
    )
    pins = constraints()
    cpu_build = {gpu: cpu for cpu, gpu in deps.GPU_BUILDS.items()}
    assert lines
    for line in lines:
        name, sep, version = line.partition("==")
        assert sep, f"{line!r} in pyproject.toml is not pinned"
        assert pins.get(norm(cpu_build.get(name, name))) == version, f"{line} differs from requirements/constraints.txt"
    # Every pip install in the image is constrained by the same file; no version is pinned in the Dockerfile.
    installs = re.findall(r"pip install[^\n&]*", text)
    assert installs
    for command in installs:
        assert "-c requirements/constraints.txt" in command or "--no-deps /wheels/" in command, command
    assert "==" not in text


def test_torch_only_in_the_ml_image():
    def names(dockerfile):
        args = deps_args(dockerfile)
        extras = [a for a in args if not a.startswith("--")]
        return {
            norm(r.split("==")[0]) for r in deps.requirements(ROOT / "pyproject.toml", extras, "--no-core" not in args)
        }

    by_image = {p.stem: names(p) for p in DOCKERFILES}
    assert "torch" in by_image["ml"] and "mlflow" in by_image["ml"] and "kfp" in by_image["ml"]
    assert "torch" not in by_image["cpu"] and "kfp" in by_image["cpu"]
    assert {"mlflow", "boto3", "psycopg2-binary"} <= by_image["mlflow"] and "torch" not in by_image["mlflow"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_images_run_unprivileged_and_hold_no_secrets(dockerfile):
    text = dockerfile.read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "the last USER must be a numeric non-root uid (runAsNonRoot needs it)"
    for name in re.findall(r"^(?:ENV|ARG)\s+(\w+)", text, re.M) + re.findall(r"\\\n\s+(\w+)=", text):
        assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", name), name


def test_base_image_python_is_the_projects_python():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    for dockerfile in DOCKERFILES:
        [image] = re.findall(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)-slim", dockerfile.read_text(), re.M)
        assert image == f"{sys.version_info.major}.{sys.version_info.minor}", (dockerfile.name, image)
        assert requires == ">=3.11,<3.13" and image in ("3.11", "3.12")


def test_build_context_holds_only_what_the_builds_copy():
    from docker.utils.build import exclude_paths

    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    context = set(exclude_paths(str(ROOT), patterns))
    for dockerfile in DOCKERFILES:
        for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), re.M):
            for source in [s for s in line.split()[:-1] if not s.startswith("--")]:
                source = source.rstrip("/")
                assert any(f == source or f.startswith(source + "/") for f in context), (dockerfile.name, source)
    for path in context:
        assert not path.startswith((".venv", ".git", ".state", "tests", "bench", "local_outputs", "shared")), path
        assert "__pycache__" not in path, path
    size = sum((ROOT / p).stat().st_size for p in context if (ROOT / p).is_file())
    assert size < 5_000_000, f"build context is {size} bytes"


def test_make_images_builds_and_pushes_the_images_the_pipeline_names(tmp_path):
    """Run the real recipe with a stand-in `docker` that records its arguments (there is no engine here)."""
    log = tmp_path / "docker.log"
    fake = tmp_path / "docker"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE_REGISTRY", "IMAGE_TAG")}
    settings = ["IMAGE_REGISTRY=registry.example/animl", "IMAGE_TAG=2024.06", f"DOCKER={fake}"]
    proc = subprocess.run(["make", "-s", "images", *settings], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    for name in ("cpu", "ml", "mlflow", "serving"):
        ref = f"registry.example/animl/animl-retrain-{name}:2024.06"
        assert f"build --platform linux/amd64 -f docker/{name}.Dockerfile -t {ref} ." in calls
        assert f"push {ref}" in calls
    assert len(calls) == 8

    code = "from animl_retrain.components.container_images import CPU_IMAGE, ML_IMAGE; print(CPU_IMAGE, ML_IMAGE)"
    named = subprocess.run(
        [sys.executable, "-c", code],
        env=env | {"IMAGE_REGISTRY": "registry.example/animl", "IMAGE_TAG": "2024.06"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert named == [
        "registry.example/animl/animl-retrain-cpu:2024.06",
        "registry.example/animl/animl-retrain-ml:2024.06",
    ]


def test_default_tag_is_the_package_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = subprocess.run(["make", "-s", "-n", "images", "DOCKER=true"], cwd=ROOT, capture_output=True, text=True)
    assert f"animl-retrain-$name:{version}" in proc.stdout
    code = "from animl_retrain.components.container_images import TAG; print(TAG)"
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE_REGISTRY", "IMAGE_TAG")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == version


def test_make_images_without_docker_says_so(tmp_path):
    proc = subprocess.run(
        ["make", "-s", "images", f"DOCKER={tmp_path / 'no-docker'}"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "make images needs" in proc.stdout + proc.stderr


def test_the_light_stages_need_nothing_the_cpu_image_lacks():
    """The CPU image has no torch, torchvision or MLflow: its stages and components must import without them."""
    code = """
import sys
for name in ("torch", "torchvision", "mlflow", "cv2", "megadetector"):
    sys.modules[name] = None  # any import of them now fails
from animl_retrain.components import cct_to_md, crop, download, export, split
from animl_retrain.stages import cct_to_md, crop, download, export, split
from animl_retrain import cli
cli.build_parser()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_images_build_without_any_registry_but_their_base(dockerfile):
    """No `# syntax=` line (it pulls a frontend image from Docker Hub); the base is a build argument."""
    text = dockerfile.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    first_from = text.index("\nFROM ")
    assert "\nARG PYTHON_IMAGE=" in text[:first_from]
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", text, re.M))
    for base in re.findall(r"^FROM (\S+)", text, re.M):
        assert base in ("${PYTHON_IMAGE}", *stages), (dockerfile.name, base)


def test_make_images_passes_the_base_image_when_given(tmp_path):
    log = tmp_path / "docker.log"
    fake = tmp_path / "docker"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    base = "mirror.example/python:3.11-slim-bookworm"
    proc = subprocess.run(
        ["make", "-s", "images", f"DOCKER={fake}", f"PYTHON_IMAGE={base}"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    builds = [line for line in log.read_text().splitlines() if line.startswith("build ")]
    assert len(builds) == 4 and all(f"--build-arg PYTHON_IMAGE={base} ." in line for line in builds)


def test_the_ml_image_sees_only_the_gpus_the_scheduler_gave_it():
    """NVIDIA's device plugin sets NVIDIA_VISIBLE_DEVICES for a pod with a GPU limit; `all` in the image would give
    a pod without one every GPU of its node."""
    assert "NVIDIA_VISIBLE_DEVICES=" not in (ROOT / "docker" / "ml.Dockerfile").read_text()
