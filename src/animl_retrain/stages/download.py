"""Stage 2, download: fetch every full-size image the export needs (kept objects, or marked for detection).

Bounded concurrency, retries with backoff on transient errors, skip-if-present-and-same-size (a re-run fetches
only what is missing), each object checked against its stored checksum (by botocore, where S3 keeps one) or
else its MD5 ETag, and atomic writes (a killed run never leaves a half-written file under its final name).
Each image is checked to be whole without decoding it (:func:`animl_retrain.vision.images.verify_image`; the crop
stage decodes it anyway). Missing objects and truncated or undecodable images are listed in ``report.json``
and skipped; the stage fails above ``max_missing_fraction`` or when objects could not be fetched at all (a
dead endpoint), so that nothing is lost silently. An endpoint that dies mid-run is given up on after one object
has spent its retries on it, rather than once per object. ``images.csv`` lists the images on disk.

With ``cache_uri`` set, each image is named by the checksum its source keeps, images already in that
content-addressed cache are not fetched again (``images.csv`` lists them with their checksum; the crop stage
reads them, or their crops, from the cache), and new ones are added to it (:mod:`animl_retrain.core.cache`).
"""

from __future__ import annotations

import hashlib
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, Field
from tqdm import tqdm

from animl_retrain.config import StageConfig
from animl_retrain.core import cache, storage
from animl_retrain.core.checks import safe_relpath
from animl_retrain.core.errors import DiskFullError, PipelineError, UnsafePathError
from animl_retrain.core.io import atomic_path, remove_partial_files
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.formats import layout, tables
from animl_retrain.vision.images import DEFAULT_MAX_PIXELS, BadImageError, verify_image

CHUNK = 1 << 20


class DownloadConfig(StageConfig):
    """Settings of the download stage."""

    export: Path = Field(description="output folder of the export stage")
    images_uri: str = Field(
        description="where the images live: s3://bucket[/prefix] (Animl's serving bucket) or a folder"
    )
    out: Path = Field(description="output folder")
    workers: int = Field(16, ge=1, le=256, description="concurrent downloads")
    retries: int = Field(5, ge=0, le=20, description="retries per object on transient errors, with backoff")
    max_missing_fraction: float = Field(0.05, ge=0, le=1, description="fail if more images than this are missing")
    verify: bool = Field(True, description="check each image is whole (header, pixel ceiling, JPEG end marker)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="refuse images with more pixels than this")
    cache_uri: str = Field(
        "", description="content-addressed cache (s3://bucket/prefix or a folder) shared by reruns; '' turns it off"
    )
    cache_max_gb: float = Field(50.0, gt=0, description="size limit of the cache; the oldest entries go first")


class DownloadResult(BaseModel):
    """What the download stage produced."""

    downloaded: int
    already_present: int
    in_cache: int = 0
    missing: int
    corrupt: int
    bytes: int


class _Missing(Exception):
    pass


class _Source:
    """Reads objects from an S3 prefix or a local folder."""

    def __init__(self, uri: str, workers: int):
        self.uri = uri
        self.local = None if storage.is_s3(uri) else Path(uri)
        if self.local is not None:
            if not self.local.is_dir():
                raise PipelineError(f"images folder not found: {uri}")
            return
        self.bucket, prefix = storage.parse_s3_uri(uri)
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""
        self.client = storage.s3_client(max_pool_connections=workers, max_attempts=3)
        storage.check_bucket(self.client, self.bucket)

    def checksums(self, keys: list[str]) -> dict[str, str | None]:
        """The content checksum the source keeps for each key (S3: one listing; a folder: hashing each file)."""
        if self.local is not None:
            paths = {key: self.local / safe_relpath(key, "image key") for key in keys}
            return {key: cache.file_checksum(p) if p.is_file() else None for key, p in paths.items()}
        # Only under the keys' longest common prefix (Animl's ``original/``): not the rest of the bucket, which
        # may hold the cache itself or other projects; each listed object costs ~0.2 ms of botocore's parsing.
        etags = {}
        prefix = self.prefix + _common_prefix(keys)
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            etags.update({o["Key"][len(self.prefix) :]: o.get("ETag", "") for o in page.get("Contents", [])})
        return {key: cache.etag_checksum(etags[key]) if key in etags else None for key in keys}

    def size(self, key: str) -> int | None:
        """Size of the object, or None if it does not exist."""
        if self.local is not None:
            path = self.local / safe_relpath(key, "image key")
            return path.stat().st_size if path.is_file() else None
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)["ContentLength"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def copy_to(self, key: str, dest: Path) -> int:
        """Copy the object to ``dest`` (a temporary path) and return its size; raise _Missing if absent."""
        if self.local is not None:
            src = self.local / safe_relpath(key, "image key")
            if not src.is_file():
                raise _Missing(str(src))
            shutil.copyfile(src, dest)
            return dest.stat().st_size
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise _Missing(f"s3://{self.bucket}/{self.prefix}{key}") from e
            raise
        from botocore.httpchecksum import StreamingChecksumBody

        etag = obj.get("ETag", "").strip('"')
        # Where the object has a stored checksum (CRC32 and the like), botocore checks it as the body streams and
        # raises at the end on a mismatch; hashing the bytes a second time for the ETag would only cost CPU.
        md5 = None if isinstance(obj["Body"], StreamingChecksumBody) else hashlib.md5(usedforsecurity=False)
        size = 0
        with open(dest, "wb") as f:
            for chunk in obj["Body"].iter_chunks(CHUNK):
                if md5 is not None:
                    md5.update(chunk)
                f.write(chunk)
                size += len(chunk)
        if size != obj["ContentLength"]:
            raise OSError(f"short read: {size} of {obj['ContentLength']} bytes")
        if md5 is not None and etag and "-" not in etag and len(etag) == 32 and md5.hexdigest() != etag:
            raise OSError("MD5 does not match the object's ETag")
        return size


def _common_prefix(keys: list[str]) -> str:
    """The longest string every key starts with (that of the first and last in sorted order)."""
    if not keys:
        return ""
    first, last = min(keys), max(keys)
    for i, (a, b) in enumerate(zip(first, last, strict=False)):
        if a != b:
            return first[:i]
    return first if len(first) <= len(last) else last


def _is_transient(exc: Exception) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return (
            status >= 500
            or status == 429
            or exc.response.get("Error", {}).get("Code") in ("SlowDown", "RequestTimeout")
        )
    return isinstance(exc, OSError | BotoCoreError)


def _unreachable(exc: Exception) -> bool:
    """Whether ``exc`` says the S3 endpoint does not answer at all (connection refused or closed)."""
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    return isinstance(exc, EndpointConnectionError | ConnectionClosedError)


def _fetch_one(
    source: _Source, row: dict, dest_root: Path, cfg: DownloadConfig, down: threading.Event
) -> tuple[str, int, str]:
    """Fetch one image; return (status, bytes, detail) with status in ok/present/missing/corrupt/failed.

    Once one fetch has found the endpoint unreachable after all its retries (``down`` set), the rest are not
    tried: each would spend its own retries on a dead server. They are reported as failed; a re-run resumes.
    """
    dest = dest_root / row["file"]
    if row.get("_deferred"):
        return "cached", 0, ""
    if down.is_set():
        return "failed", 0, "not tried: the S3 endpoint stopped answering during this run"
    try:
        key = row["key"]
        if dest.is_file():
            size = source.size(key)
            if size is not None and size == dest.stat().st_size:
                return "present", 0, ""
        for attempt in range(cfg.retries + 1):
            try:
                with atomic_path(dest) as tmp:
                    size = source.copy_to(key, tmp)
                    if cfg.verify:
                        verify_image(tmp, cfg.max_pixels)
                    store = row.get("_cache")
                    if store is not None and row["checksum"] and not store.put_image(row["checksum"], tmp.read_bytes()):
                        row["checksum"] = ""  # changed since the listing: the crop stage hashes the file itself
                return "ok", size, ""
            except (_Missing, BadImageError, UnsafePathError):
                raise
            except Exception as e:
                if not _is_transient(e) or attempt == cfg.retries:
                    raise
                time.sleep(min(8.0, 0.25 * 2**attempt) * (0.5 + random.random()))
    except _Missing as e:
        return "missing", 0, str(e)
    except (BadImageError, UnsafePathError) as e:
        return "corrupt", 0, str(e)
    except DiskFullError:
        raise  # every other write would fail the same way: stop, keeping the complete files
    except Exception as e:
        if source.local is None and _unreachable(e):
            down.set()
        return "failed", 0, storage.describe_s3_error(e, row["key"]) if source.local is None else str(e)
    raise AssertionError("unreachable")


def run(cfg: DownloadConfig) -> DownloadResult:
    """Download every image with kept objects or marked for detection; write ``images.csv`` and the report."""
    report = Report("download")
    images = tables.read_table(Path(cfg.export) / layout.IMAGES_TABLE, tables.IMAGES)
    wanted = images[(images["n_objects"] > 0) | images["needs_detection"]]
    for f, key in zip(wanted["file"], wanted["key"], strict=True):
        safe_relpath(f, "file")  # the export stage checked these; never trust a table blindly
        safe_relpath(key, "image key")  # nor read outside the images prefix or folder
    source = _Source(cfg.images_uri, cfg.workers)
    dest_root = Path(cfg.out) / layout.IMAGES_DIR
    dest_root.mkdir(parents=True, exist_ok=True)
    report.details["removed_partial_files"] = remove_partial_files(dest_root)
    rows, store = _use_cache(cfg, source, wanted, report)
    statuses, total_bytes = _fetch_all(cfg, source, rows, dest_root, report)
    if store is not None:
        report.details["cache"]["entries_trimmed"] = store.trim(keep={r["checksum"] for r in rows})

    wanted = wanted.assign(_status=statuses, checksum=[r["checksum"] for r in rows])
    on_disk = wanted[wanted["_status"].isin(["ok", "present", "cached"])].drop(columns="_status")
    counts = {s: statuses.count(s) for s in ("ok", "present", "cached", "missing", "corrupt", "failed")}
    report.counts = {
        "wanted": len(wanted),
        "wanted_for_detection": int(wanted["needs_detection"].sum()),
        "downloaded": counts["ok"],
        "already_present": counts["present"],
        "in_cache": counts["cached"],
        "missing": counts["missing"],
        "corrupt": counts["corrupt"],
        "failed": counts["failed"],
        "bytes": total_bytes,
    }
    tables.write_table(on_disk, Path(cfg.out) / layout.IMAGES_TABLE, tables.IMAGES)
    report.finish(cfg.out)
    _check_losses(cfg, counts, len(wanted), report)
    log.info(
        "download: %d fetched, %d already present, %d missing, %d corrupt",
        counts["ok"],
        counts["present"],
        counts["missing"],
        counts["corrupt"],
    )
    return DownloadResult(
        downloaded=counts["ok"],
        already_present=counts["present"],
        in_cache=counts["cached"],
        missing=counts["missing"],
        corrupt=counts["corrupt"],
        bytes=total_bytes,
    )


def _use_cache(cfg: DownloadConfig, source: _Source, wanted, report: Report):
    """The rows to fetch, each with its source checksum; with a cache, images already in it are not fetched.

    Such an image stays listed in ``images.csv`` (with its checksum) but is left in the cache: the crop stage
    takes its crops from the cache, or the image itself where a crop is new. Images the detector will see
    (``needs_detection``) are always fetched, and so is every image whose source keeps no usable checksum (an
    S3 multipart ETag). Newly fetched images are added to the cache. Returns the rows and the cache (or None).
    """
    rows = wanted.to_dict("records")
    if not cfg.cache_uri:
        return [{**r, "checksum": ""} for r in rows], None
    # the source's S3 client serves the cache too (the same endpoint and credentials, from the environment)
    client = getattr(source, "client", None) if storage.is_s3(cfg.cache_uri) else None
    store = cache.ContentCache(cfg.cache_uri, cfg.cache_max_gb, client=client)
    with ThreadPoolExecutor(1) as pool:  # the two listings at once: one's parsing while the other's server works
        cached = pool.submit(store.image_checksums)
        sums = source.checksums([r["key"] for r in rows])
        present = cached.result()
    for r in rows:
        r["checksum"] = sums.get(r["key"]) or ""
        r["_deferred"] = bool(r["checksum"]) and r["checksum"] in present and not r["needs_detection"]
        r["_cache"] = None if r["_deferred"] or r["checksum"] in present else store
    report.details["cache"] = {"uri": cfg.cache_uri, "images_in_cache": sum(r["_deferred"] for r in rows)}
    return rows, store


def _fetch_all(cfg: DownloadConfig, source, rows: list[dict], dest_root: Path, report: Report) -> tuple[list[str], int]:
    """Fetch ``rows`` in ``cfg.workers`` threads; each row's status, and the bytes fetched. Failures are reported."""
    statuses: list[str] = []
    total_bytes = 0
    with ThreadPoolExecutor(cfg.workers) as pool:
        down = threading.Event()
        results = pool.map(lambda r: _fetch_one(source, r, dest_root, cfg, down), rows)
        for row, (status, nbytes, detail) in tqdm(
            zip(rows, results, strict=True), total=len(rows), desc="download", disable=None
        ):
            statuses.append(status)
            total_bytes += nbytes
            if status in ("missing", "corrupt", "failed"):
                report.problem(f"{status} image", f"image {row['image_id']!r} key {row['key']!r}", detail)
    return statuses, total_bytes


def _check_losses(cfg: DownloadConfig, counts: dict[str, int], wanted: int, report: Report) -> None:
    """Stop on images that could not be fetched, or on more missing and broken ones than allowed."""
    if counts["failed"]:
        first = next(p for p in report.problems if p["what"] == "failed image")
        raise PipelineError(
            f"download: {counts['failed']} of {wanted} images could not be fetched after {cfg.retries} retries "
            f"(first: {first['where']}: {first['detail']}). Files already on disk are complete; re-run to resume."
        )
    lost = counts["missing"] + counts["corrupt"]
    if wanted and lost / wanted > cfg.max_missing_fraction:
        raise PipelineError(
            f"download: {lost} of {wanted} images are missing or undecodable, over max_missing_fraction="
            f"{cfg.max_missing_fraction}; see {Path(cfg.out) / layout.STAGE_REPORT_FILE}"
        )
