"""What every component body does: configure logging, build the stage's config, run it, publish its result."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import configure_logging, log


def flat_metadata(result: Any) -> dict[str, Any]:
    """A stage result as flat scalar metadata for the Kubeflow UI."""
    data = result.model_dump() if hasattr(result, "model_dump") else dict(result)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, int | float | str | bool)})
        elif isinstance(value, int | float | str | bool):
            out[key] = value
    return out


def run_stage(run: Callable, config: type, artifact=None, **values: Any):
    """Run one stage; a PipelineError ends the task with its message (and exit status 1), not a traceback."""
    configure_logging()
    try:
        result = run(config.build(**values))
    except PipelineError as e:
        log.error("%s", e)
        sys.exit(1)
    if artifact is not None:
        artifact.metadata.update(flat_metadata(result))
    return result
