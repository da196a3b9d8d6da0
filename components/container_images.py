"""The two container images the components run on (built from ``docker/``; see ``make images``).

The light stages (export, download, cct-to-md, crop, split) run on the CPU tools image; detection, training,
evaluation and registration need torch and run on the CUDA image (which also runs on CPU nodes).
"""

import os
from importlib.metadata import version

# The same defaults as `make images` (Makefile): the tag is the package version.
REGISTRY = os.environ.get("IMAGE_REGISTRY", "ghcr.io/animl-retrain")
TAG = os.environ.get("IMAGE_TAG") or version("animl-retrain")
CPU_IMAGE = f"{REGISTRY}/animl-retrain-cpu:{TAG}"
ML_IMAGE = f"{REGISTRY}/animl-retrain-ml:{TAG}"
