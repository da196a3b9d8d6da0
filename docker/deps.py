"""Print this package's pinned requirements from pyproject.toml, for the image builds (``docker/*.Dockerfile``).

Usage: ``python deps.py [--no-core] [--gpu] [EXTRA ...]``; ``--gpu`` swaps in the CUDA builds of
:data:`GPU_BUILDS` at the same version (MegaDetector's ONNX Runtime). The images install these lines with
``-c requirements/constraints.txt``, so the pins in the images are the pins of the project's own environment
(one source of truth; ``tests/test_images.py`` checks the two agree).
"""

import sys
import tomllib
from pathlib import Path

# CPU package -> its CUDA build, published with the same version numbers; never install both (same module).
GPU_BUILDS = {"onnxruntime": "onnxruntime-gpu"}


def requirements(pyproject: Path, extras: list[str], core: bool = True, gpu: bool = False) -> list[str]:
    """The requirement lines of the package's core dependencies (unless ``core`` is false) and ``extras``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"deps.py: no extra {unknown} in {pyproject}; extras: {sorted(optional)}")
    lines = (project["dependencies"] if core else []) + [r for e in extras for r in optional[e]]
    if gpu:
        lines = [GPU_BUILDS.get(n, n) + sep + v for n, sep, v in (line.partition("==") for line in lines)]
    return lines


def main(argv: list[str]) -> None:
    """Print the requirement lines, one a line."""
    extras = [a for a in argv if not a.startswith("--")]
    print("\n".join(requirements(Path("pyproject.toml"), extras, core="--no-core" not in argv, gpu="--gpu" in argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
