"""Checks on values that come from outside: finite numbers, paths that must stay in their folder, safe names."""

from __future__ import annotations

import math
import re

from animl_retrain.core.errors import PipelineError, UnsafePathError

_DRIVE = re.compile(r"^[A-Za-z]:")


def finite_number(value: object) -> bool:
    """Whether ``value`` is an int or float (not a bool) with a finite value, as JSON input must be to be used.

    NaN and infinities fail, and so does an integer too large for a float (``10**400``), which would overflow
    every computation it reaches.
    """
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def safe_relpath(name: object, what: str = "path") -> str:
    """Return ``name`` if it is a plain relative POSIX path that stays inside its folder.

    Rejects absolute paths, drive letters, backslashes, empty, ``.`` and ``..`` segments and control
    characters, so that a path taken from an export can never read or write outside its folder.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{what} must be a non-empty string, got {name!r}")
    if "\\" in name or name.startswith("/") or _DRIVE.match(name):
        raise UnsafePathError(f"{what} {name!r} is absolute or uses backslashes")
    if any(ord(c) < 32 for c in name):
        raise UnsafePathError(f"{what} {name!r} contains control characters")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise UnsafePathError(f"{what} {name!r} has an empty, '.' or '..' segment")
    return name


def safe_filename(text: str, max_len: int = 120) -> str:
    """Turn any id into a file-name stem made of letters, digits, '-', '_' and '.'."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"
    return stem[:max_len]


MAX_GPUS = 16


def gpu_count(value: object, name: str = "train_gpus") -> int:
    """A GPU count given as text ('0' to '16'), as the pipeline takes it; a clear error for anything else.

    The pipeline's GPU counts are strings because Kubeflow's driver reads a GPU limit only from a string
    parameter; an int or a numeric string is accepted here, a float, a bool or a word is not.
    """
    text = str(value).strip() if isinstance(value, int | str) and not isinstance(value, bool) else ""
    if not text.isdigit() or int(text) > MAX_GPUS:
        raise PipelineError(f"{name}={value!r}: expected a whole number of GPUs from 0 to {MAX_GPUS}, e.g. '1'")
    return int(text)
