"""The errors a user can act on: the CLI and the components print their message, never a traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """An error the user can act on; the CLI prints its message without a traceback."""


class UnsafePathError(PipelineError):
    """A path from the input would leave the folder it must stay in."""


class DiskFullError(PipelineError):
    """A write failed because the file system is full (or the quota is spent); nothing was left half-written."""
