"""The package's logger, its one configuration, and hiding credentials before anything is logged."""

from __future__ import annotations

import logging
import re

log = logging.getLogger("animl_retrain")


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr with a short, readable format."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("botocore", "urllib3", "boto3", "s3transfer", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def redact_url(url: str) -> str:
    """Hide any ``user:password@`` part of a URL before it reaches a log or an error message."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", url)
