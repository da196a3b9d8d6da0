"""The one resumable store: the files of a job that may be killed and started again, in a folder or on S3.

A location (a local folder or an ``s3://`` prefix, one per job) holds the job's files, each replaced whole (an
atomic rename locally, a single PUT on S3), so a kill while saving leaves the previous version intact. The
settings that decide a job's result are recorded with its partial results; a restart under other settings is
refused with the settings that changed, never silently mixed in or silently thrown away (:func:`check_settings`).
Detection keeps its finished shards here, training its resume checkpoint (:mod:`animl_retrain.modeling.checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from animl_retrain.core import storage
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import decode_json

MAX_RECORD_BYTES = 64 << 20


class ResumableStore:
    """The files of one resumable job at ``uri`` (a folder or an ``s3://`` prefix); ``what`` names it in errors."""

    def __init__(self, uri: str, what: str = "checkpoint"):
        self.uri = uri.rstrip("/") if storage.is_s3(uri) else uri
        self.what = what

    def path(self, name: str) -> str:
        """The local path or S3 URI of the file ``name``."""
        return storage.join(self.uri, name)

    def names(self) -> list[str]:
        """The files directly under the location, sorted."""
        if not storage.is_s3(self.uri):
            folder = Path(self.uri)
            return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        bucket, prefix = storage.parse_s3_uri(self.uri)
        prefix = prefix + "/" if prefix else ""
        names: list[str] = []
        pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        try:
            for page in pages:
                names += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
        except Exception as e:
            raise PipelineError(storage.describe_s3_error(e, self.uri)) from e
        return sorted(n for n in names if n and "/" not in n)

    def exists(self, name: str) -> bool:
        """Whether the file ``name`` is there."""
        return storage.exists(self.path(name))

    def read_json(self, name: str) -> Any:
        """The JSON file ``name``; a broken one is an error that names it and says how to start afresh."""
        where = f"{self.what} file {self.path(name)}"
        try:
            return decode_json(storage.read_bytes(self.path(name), max_bytes=MAX_RECORD_BYTES), where)
        except PipelineError as e:
            raise PipelineError(f"{e}; delete {self.uri} to start afresh") from e

    def write_json(self, name: str, data: Any) -> None:
        """Replace the JSON file ``name``."""
        import json

        storage.put_bytes(self.path(name), json.dumps(data).encode())

    def upload(self, name: str, local: Path) -> None:
        """Replace the file ``name`` with the local file ``local``."""
        storage.upload_file(local, self.path(name))

    def download(self, name: str, dest: Path) -> Path:
        """Copy the file ``name`` to ``dest``."""
        return storage.fetch(self.path(name), dest)

    def delete(self, name: str) -> None:
        """Remove the file ``name`` (nothing happens when it is not there)."""
        if storage.is_s3(self.uri):
            bucket, key = storage.parse_s3_uri(self.path(name))
            try:
                storage.s3_client().delete_object(Bucket=bucket, Key=key)
            except Exception as e:
                raise PipelineError(storage.describe_s3_error(e, self.path(name))) from e
        else:
            Path(self.path(name)).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every file, the temporary files of killed writes, and a local folder left empty."""
        for name in self.names():
            self.delete(name)
        folder = Path(self.uri)
        if not storage.is_s3(self.uri) and folder.is_dir():
            for stale in folder.glob(".*.part"):
                stale.unlink(missing_ok=True)
            if not any(folder.iterdir()):
                folder.rmdir()

    def check_settings(self, found: dict[str, Any], now: dict[str, Any]) -> None:
        """Refuse to resume when the settings recorded with the partial results differ from this run's."""
        check_settings(found, now, f"the {self.what} at {self.uri}")


def check_settings(found: dict[str, Any], now: dict[str, Any], where: str) -> None:
    """Raise a PipelineError naming every setting that differs between ``found`` (recorded) and ``now``."""
    changed = sorted(k for k in set(found) | set(now) if found.get(k) != now.get(k))
    if changed:
        diff = ", ".join(f"{k}: {found.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise PipelineError(
            f"{where} was made with other settings ({diff}); "
            "restart with the same settings, delete it to start afresh, or use a new checkpoint location"
        )
