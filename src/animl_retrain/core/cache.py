"""A content-addressed cache in the user's bucket (or a folder), so that a scheduled retrain redoes no unchanged work.

Two kinds of entries under one prefix, each found by a key derived from content alone and checked on every read:

- **images** (the download stage): ``images/<checksum>``, the image's bytes, named by the checksum the source
  itself keeps (``md5-<hex>``: an S3 object's single-part ETag; ``sha256-<hex>`` for a local file). One object
  per image: it appears whole or not at all (an S3 PUT is atomic, a local write is renamed into place).
- **packs** (the crop stage): a run's new crops go into one ``packs/<id>.bin`` (their bytes, one after the
  other) and ``packs/<id>.json`` (key -> offset, length, sha256), the index written last, so that a stage killed
  mid-way leaves a pack without an index, which readers ignore and the size limit removes. A warm run reads
  each pack in one request instead of one request per crop.

Reads refuse an entry whose bytes do not match its checksum (counted in :attr:`ContentCache.refused`, then
treated as a miss: the work is redone). ``max_gb`` bounds the prefix: the download stage trims it after its
fetches, oldest entries first, keeping the images of its own run; so between runs the cache can exceed the
limit by one run's new crops.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from animl_retrain.core import storage
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import atomic_path
from animl_retrain.core.logging import log

IMAGES = "images"
PACKS = "packs"


def file_checksum(path: Path) -> str:
    """``sha256-<hex>`` of a local file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256-{digest.hexdigest()}"


def etag_checksum(etag: str) -> str | None:
    """``md5-<hex>`` for an S3 ETag that is the object's MD5 (single-part uploads); None for any other."""
    etag = etag.strip('"').lower()
    return f"md5-{etag}" if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag) else None


def matches(checksum: str, data: bytes) -> bool:
    """Whether ``data`` has the ``md5-…`` or ``sha256-…`` checksum."""
    kind, _, hexdigest = checksum.partition("-")
    if kind not in ("md5", "sha256"):
        return False
    return hashlib.new(kind, data, usedforsecurity=False).hexdigest() == hexdigest


@dataclass
class _Object:
    name: str  # relative to the cache prefix
    size: int
    modified: float


class ContentCache:
    """The cache under ``uri`` (``s3://bucket/prefix`` or a folder), bounded to ``max_gb``."""

    def __init__(self, uri: str, max_gb: float, client=None):
        """``client``: an S3 client to share (one costs ~50 ms of CPU to make); default: a new one."""
        if not uri:
            raise PipelineError("cache: no cache_uri given")
        if max_gb <= 0:
            raise PipelineError(f"cache: cache_max_gb must be positive, not {max_gb}")
        self.uri, self.max_bytes = uri.rstrip("/"), int(max_gb * 1e9)
        self.refused = 0
        self._client = None
        self._images: list[_Object] | None = None  # the last listing of the images
        if storage.is_s3(uri):
            self.bucket, prefix = storage.parse_s3_uri(self.uri)
            self.prefix = prefix.rstrip("/") + "/" if prefix else ""
            self._client = client or storage.s3_client(max_pool_connections=16)
            storage.check_bucket(self._client, self.bucket)

    # -- the storage underneath: an S3 prefix or a folder -------------------------------------------------------
    def _list(self, folder: str) -> list[_Object]:
        if self._client is None:
            root = Path(self.uri) / folder
            return [
                _Object(f"{folder}/{p.name}", p.stat().st_size, p.stat().st_mtime)
                for p in (root.iterdir() if root.is_dir() else [])
                if p.is_file() and not p.name.startswith(".")
            ]
        out = []
        for page in self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}{folder}/"
        ):
            out += [
                _Object(o["Key"][len(self.prefix) :], o["Size"], o["LastModified"].timestamp())
                for o in page.get("Contents", [])
            ]
        return out

    def _get(self, name: str) -> bytes | None:
        if self._client is None:
            path = Path(self.uri) / name
            return path.read_bytes() if path.is_file() else None
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise PipelineError(storage.describe_s3_error(e, f"{self.uri}/{name}")) from e

    def _put(self, name: str, data: bytes) -> None:
        if self._client is None:
            with atomic_path(Path(self.uri) / name) as tmp:
                tmp.write_bytes(data)
            return
        self._client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def _delete(self, name: str) -> None:
        if self._client is None:
            (Path(self.uri) / name).unlink(missing_ok=True)
        else:
            self._client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    # -- images, by the checksum the source keeps ---------------------------------------------------------------
    def image_checksums(self) -> set[str]:
        """The checksums of every cached image (one listing, not one request per image; kept for :meth:`trim`)."""
        self._images = self._list(IMAGES)
        return {o.name.split("/", 1)[1] for o in self._images}

    def get_image(self, checksum: str) -> bytes | None:
        """The cached image, or None when absent or when its bytes do not match the checksum (refused)."""
        data = self._get(f"{IMAGES}/{checksum}")
        if data is not None and not matches(checksum, data):
            self.refused += 1
            log.warning("cache: refused image %s: its bytes do not match the checksum", checksum)
            return None
        return data

    def put_image(self, checksum: str, data: bytes) -> bool:
        """Store an image under its checksum; False (nothing stored) when the bytes do not match it."""
        if not matches(checksum, data):
            return False
        self._put(f"{IMAGES}/{checksum}", data)
        return True

    # -- packs of small entries (crops), by any content-derived key ---------------------------------------------
    def pack_index(self) -> dict[str, tuple[str, int, int, str]]:
        """Every packed entry: key -> (pack name, offset, length, sha256). Packs without an index are ignored."""
        index: dict[str, tuple[str, int, int, str]] = {}
        for obj in sorted(self._list(PACKS), key=lambda o: o.modified):
            if obj.name.endswith(".json"):
                raw = self._get(obj.name)
                try:
                    entries = json.loads(raw) if raw is not None else {}
                except ValueError:
                    self.refused += 1
                    continue
                pack = obj.name[: -len(".json")] + ".bin"
                index.update({k: (pack, int(v[0]), int(v[1]), str(v[2])) for k, v in entries.items()})
        return index

    def get_packed(self, keys: list[str], index: dict[str, tuple[str, int, int, str]]) -> dict[str, bytes]:
        """The entries of ``keys`` found in ``index``, one read per pack; mismatching entries are refused."""
        by_pack: dict[str, list[str]] = {}
        for key in keys:
            if key in index:
                by_pack.setdefault(index[key][0], []).append(key)
        found = {}
        for pack, wanted in by_pack.items():
            data = self._get(pack)
            for key in wanted:
                _, offset, length, sha = index[key]
                entry = data[offset : offset + length] if data is not None else b""
                if len(entry) == length and hashlib.sha256(entry).hexdigest() == sha:
                    found[key] = entry
                else:
                    self.refused += 1
        if len(found) < sum(len(w) for w in by_pack.values()):
            log.warning("cache: refused %d packed entries whose bytes do not match", self.refused)
        return found

    def put_packed(self, entries: dict[str, bytes]) -> None:
        """Write ``entries`` as one new pack, its index last."""
        if not entries:
            return
        name, offset, index, chunks = f"{PACKS}/{uuid.uuid4().hex}", 0, {}, []
        for key, data in entries.items():
            index[key] = [offset, len(data), hashlib.sha256(data).hexdigest()]
            chunks.append(data)
            offset += len(data)
        self._put(f"{name}.bin", b"".join(chunks))
        self._put(f"{name}.json", json.dumps(index).encode())

    def trim(self, keep: set[str] = frozenset()) -> int:
        """Delete the oldest entries (a pack's index before its data) until the cache is under ``max_gb``.

        Images whose checksum is in ``keep`` (the ones this run uses) stay. Returns how many objects went.
        """
        images = self._images if self._images is not None else self._list(IMAGES)
        objects = sorted(images + self._list(PACKS), key=lambda o: o.modified)
        total, removed = sum(o.size for o in objects), 0
        for obj in objects:
            if total <= self.max_bytes:
                break
            if obj.name.startswith(f"{IMAGES}/") and obj.name.split("/", 1)[1] in keep:
                continue
            if obj.name.endswith(".bin"):  # its index first: readers must never see an index without its pack
                self._delete(obj.name[: -len(".bin")] + ".json")
            self._delete(obj.name)
            total -= obj.size
            removed += 1
        return removed
