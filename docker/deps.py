"""Print this package's pinned requirements from pyproject.toml, for the image builds (``docker/*.Dockerfile``).

Usage: ``python deps.py [--no-core] [EXTRA ...]``. The images install these lines with
``-c requirements/constraints.txt``, so the pins in the images are the pins of the project's own environment
(one source of truth; ``tests/test_images.py`` checks the two agree).
"""

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str], core: bool = True) -> list[str]:
    """The requirement lines of the package's core dependencies (unless ``core`` is false) and ``extras``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"deps.py: no extra {unknown} in {pyproject}; extras: {sorted(optional)}")
    return (project["dependencies"] if core else []) + [r for e in extras for r in optional[e]]


def main(argv: list[str]) -> None:
    """Print the requirement lines, one a line."""
    extras = [a for a in argv if not a.startswith("--")]
    print("\n".join(requirements(Path("pyproject.toml"), extras, core="--no-core" not in argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
