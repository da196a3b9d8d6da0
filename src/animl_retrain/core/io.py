"""Small pieces every stage uses: errors, atomic writes, safe paths and the stage report."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("animl_retrain")

REPORT_NAME = "report.json"


class PipelineError(Exception):
    """An error the user can act on; the CLI prints its message without a traceback."""


class UnsafePathError(PipelineError):
    """A path from the input would leave the folder it must stay in."""


class DiskFullError(PipelineError):
    """A write failed because the file system is full (or the quota is spent); nothing was left half-written."""


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


_DRIVE = re.compile(r"^[A-Za-z]:")


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


def redact_url(url: str) -> str:
    """Hide any ``user:password@`` part of a URL before it reaches a log or an error message."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", url)


def safe_filename(text: str, max_len: int = 120) -> str:
    """Turn any id into a file-name stem made of letters, digits, '-', '_' and '.'."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"
    return stem[:max_len]


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


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, pretty-printed and with a trailing newline."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path, what: str | None = None) -> Any:
    """Read a JSON file, turning a parse error into a message that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise PipelineError(f"{what or 'file'} not found: {path}") from e
    except json.JSONDecodeError as e:
        raise PipelineError(f"{what or path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise PipelineError(f"{what or path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise PipelineError(f"{what or path} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise PipelineError(f"{what or path} is JSON nested too deeply") from e


class Report:
    """What a stage did: counts, skipped items with the reason, and how long it took.

    Written as ``report.json`` in the stage's output folder and shown in the run summary.
    """

    def __init__(self, stage: str):
        self.stage = stage
        self.counts: dict[str, Any] = {}
        self.problems: list[dict[str, str]] = []
        self.details: dict[str, Any] = {}
        self._start = time.perf_counter()
        self.seconds = 0.0

    def problem(self, what: str, where: str, detail: str = "") -> None:
        """Record one skipped item and log it."""
        self.problems.append({"what": what, "where": where, "detail": detail})
        log.warning("%s: %s: %s %s", self.stage, what, where, detail)

    def problem_counts(self) -> dict[str, int]:
        """Count problems by kind."""
        out: dict[str, int] = {}
        for p in self.problems:
            out[p["what"]] = out.get(p["what"], 0) + 1
        return out

    def finish(self, out_dir: Path | None = None) -> dict[str, Any]:
        """Stop the clock, optionally write ``report.json`` into ``out_dir``, and return the report."""
        self.seconds = round(time.perf_counter() - self._start, 3)
        data = {
            "stage": self.stage,
            "seconds": self.seconds,
            "counts": self.counts,
            "problem_counts": self.problem_counts(),
            "problems": self.problems,
            **self.details,
        }
        if out_dir is not None:
            write_json(Path(out_dir) / REPORT_NAME, data)
        return data


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr with a short, readable format."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("botocore", "urllib3", "boto3", "s3transfer", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
