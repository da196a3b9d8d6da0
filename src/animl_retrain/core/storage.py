"""Local paths and ``s3://`` URIs behind one small interface.

The S3 endpoint and credentials come from the environment, as boto3 reads them (``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, or an IAM role),
never from pipeline parameters, so no secret reaches the compiled pipeline or a log.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import atomic_path

S3_PREFIX = "s3://"


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an S3 object or prefix."""
    return uri.startswith(S3_PREFIX)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key may be empty."""
    if not is_s3(uri):
        raise PipelineError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_PREFIX) :].partition("/")
    if not bucket:
        raise PipelineError(f"S3 URI has no bucket: {uri!r}")
    return bucket, key


def endpoint_url() -> str | None:
    """The S3 endpoint override from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_client(max_pool_connections: int = 10, max_attempts: int = 5, timeout: float = 30.0, session=None):
    """A boto3 S3 client with bounded retries, timeouts and path-style addressing for custom endpoints.

    ``session``: a boto3 session with its own credentials (the deploy step's); default: the environment's.
    """
    import boto3
    import botocore.session
    from botocore.config import Config

    config = Config(
        max_pool_connections=max_pool_connections,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=timeout,
        read_timeout=timeout,
        s3={"addressing_style": "path"} if endpoint_url() else None,
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if session is not None:
        return session.client("s3", config=config, region_name=session.region_name or region)
    # A new session each time: the environment (credentials, endpoint) is read now, not cached from earlier.
    # Only botocore's loader of its service descriptions is shared: parsing them again costs ~0.3 s a client.
    session = botocore.session.Session()
    session.register_component("data_loader", _loader())
    session.register_component("response_parser_factory", _parsers())
    return boto3.session.Session(botocore_session=session).client("s3", config=config, region_name=region)


def _timestamp(value: str):
    """Listings' ISO 8601 times read by the standard library (botocore's dateutil parse costs ~0.2 ms each)."""
    import datetime as dt

    from botocore.utils import parse_timestamp

    try:
        return dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return parse_timestamp(value)  # HTTP dates in headers, epoch numbers


def _parsers():
    from botocore.parsers import ResponseParserFactory

    factory = ResponseParserFactory()
    factory.set_parser_defaults(timestamp_parser=_timestamp)
    return factory


@functools.cache
def _loader():
    """The loader of botocore's JSON service descriptions (it caches what it has read), one per process."""
    import botocore.loaders

    return botocore.loaders.create_loader()


def describe_s3_error(exc: Exception, uri: str) -> str:
    """A one-line explanation of an S3 failure, naming the URI and the endpoint, never the credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = f"{uri} (endpoint {endpoint_url() or 'AWS default'})"
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach the S3 endpoint for {where}: is the server up and the URL right?"
    if isinstance(exc, NoCredentialsError):
        return f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an IAM role"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        hints = {
            "InvalidAccessKeyId": "the access key is not known to this S3 server",
            "SignatureDoesNotMatch": "the secret key is wrong",
            "AccessDenied": "these credentials may not read it",
            "NoSuchBucket": "the bucket does not exist",
            "NoSuchKey": "the object does not exist",
            "404": "the object does not exist",
            "403": "access denied",
        }
        return f"S3 error {code or exc} for {where}: {hints.get(code, exc)}"
    return f"S3 failure for {where}: {exc}"


def check_bucket(client, bucket: str) -> None:
    """Fail early, with a clear message, when the endpoint, the credentials or the bucket is wrong."""
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as e:
        raise PipelineError(describe_s3_error(e, f"s3://{bucket}")) from e


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Read a whole local file or S3 object, refusing anything larger than ``max_bytes``."""
    if is_s3(uri):
        bucket, key = parse_s3_uri(uri)
        client = s3_client()
        try:
            obj = client.get_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise PipelineError(describe_s3_error(e, uri)) from e
        size = obj.get("ContentLength")
        if max_bytes is not None and size is not None and size > max_bytes:
            raise PipelineError(f"{uri} is {size} bytes, over the limit of {max_bytes}")
        return obj["Body"].read()
    path = Path(uri)
    if not path.is_file():
        raise PipelineError(f"file not found: {uri}")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise PipelineError(f"{uri} is {path.stat().st_size} bytes, over the limit of {max_bytes}")
    return path.read_bytes()


def fetch(uri: str, dest: Path) -> Path:
    """Copy a local file or S3 object to ``dest`` atomically and return ``dest``."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        if is_s3(uri):
            bucket, key = parse_s3_uri(uri)
            try:
                s3_client().download_file(bucket, key, str(tmp))
            except Exception as e:
                raise PipelineError(describe_s3_error(e, uri)) from e
        else:
            src = Path(uri)
            if not src.is_file():
                raise PipelineError(f"file not found: {uri}")
            tmp.write_bytes(src.read_bytes())
    return dest


def upload_file(path: Path, uri: str, client=None) -> None:
    """Upload a local file to an S3 URI (with ``client``, default :func:`s3_client`), or copy it to a path."""
    if not is_s3(uri):
        dest = Path(uri)
        with atomic_path(dest) as tmp:
            tmp.write_bytes(Path(path).read_bytes())
        return
    bucket, key = parse_s3_uri(uri)
    try:
        (client or s3_client()).upload_file(str(path), bucket, key)
    except Exception as e:
        raise PipelineError(describe_s3_error(e, uri)) from e


def put_bytes(uri: str, data: bytes) -> None:
    """Write bytes to an S3 URI or a local path."""
    if not is_s3(uri):
        dest = Path(uri)
        with atomic_path(dest) as tmp:
            tmp.write_bytes(data)
        return
    bucket, key = parse_s3_uri(uri)
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as e:
        raise PipelineError(describe_s3_error(e, uri)) from e


def exists(uri: str) -> bool:
    """Whether a local file or S3 object exists; other S3 failures (endpoint, credentials) raise."""
    if not is_s3(uri):
        return Path(uri).is_file()
    from botocore.exceptions import ClientError

    bucket, key = parse_s3_uri(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise PipelineError(describe_s3_error(e, uri)) from e
    except Exception as e:
        raise PipelineError(describe_s3_error(e, uri)) from e
    return True


def join(uri: str, name: str) -> str:
    """``uri`` (a folder or an s3:// prefix) joined with ``name``."""
    return f"{uri.rstrip('/')}/{name}" if is_s3(uri) else str(Path(uri) / name)
