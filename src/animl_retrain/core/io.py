"""Atomic file writes, cleaning up after killed writes, and reading and writing JSON files."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from animl_retrain.core.errors import DiskFullError, PipelineError
from animl_retrain.core.logging import log

_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# The temporary name :func:`atomic_path` writes under: ``.<name>.<8 random characters>.part``.
_PART = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.part$")


def _disk_full(e: OSError, path: Path) -> DiskFullError:
    return DiskFullError(
        f"cannot write {path}: {_DISK_FULL[e.errno]} (errno {e.errno}); free space there and re-run: "
        "files already written are complete and are kept"
    )


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds.

    Readers never see a half-written file under the final name. A full disk (or spent quota) becomes a
    :class:`DiskFullError` naming ``path``; the temporary file is removed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise _disk_full(e, path) from e
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise _disk_full(e, path) from e
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as :func:`atomic_path` does, in four system calls where it takes about ten.

    For many small files (a warm crop stage writes thousands): the temporary name is made without ``mkstemp``
    (``O_EXCL`` still refuses an existing one), and the folder is created only when the first open finds it missing.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, flags, 0o666)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise _disk_full(e, path) from e
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise _disk_full(e, path) from e
        raise


def remove_partial_files(folder: Path) -> int:
    """Delete the temporary files that writes killed mid-way (by SIGKILL or power loss) left under ``folder``.

    Only names :func:`atomic_path` makes are touched; returns how many were removed.
    """
    removed = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if _PART.match(name):
                Path(root, name).unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d partial file(s) a killed run left under %s", removed, folder)
    return removed


def json_safe(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None, so it is strict JSON (``null``).

    An undefined metric (the F1 of a class with no test crop, say) must read as "no value", not as a number:
    ``NaN`` is not JSON and most parsers reject it.
    """
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [json_safe(v) for v in data]
    if hasattr(data, "dtype") and getattr(data, "shape", None) == ():  # a numpy scalar
        return json_safe(data.item())
    return data


def write_json(path: Path, data: Any) -> None:
    """Write strict JSON atomically (undefined numbers as ``null``), pretty-printed, with a trailing newline."""
    text = json.dumps(json_safe(data), indent=2, sort_keys=False, default=str, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def decode_json(raw: bytes | str, where: str) -> Any:
    """Decode JSON text (bytes must be UTF-8); every way it can be broken is a PipelineError naming ``where``.

    The one JSON error path of the package: files, exports, label specs and serving requests all come through
    here, so a broken input reads the same wherever it arrives.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise PipelineError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise PipelineError(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise PipelineError(f"{where} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise PipelineError(f"{where} is JSON nested too deeply") from e


def read_json(path: Path, what: str | None = None) -> Any:
    """Read a JSON file; a missing or broken one is a PipelineError that names it (``what``, else the path)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise PipelineError(f"{what or 'file'} not found: {path}") from e
    return decode_json(raw, what or str(path))
