"""Typed stage configuration, shared by the CLI, the KFP components and the tests.

Each stage declares a pydantic model; the CLI builds its flags from the model's fields (name, type, default and
description), so ``--help`` and validation never drift from the code that uses them.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from animl_retrain.core.errors import PipelineError

# The registered model's name, and the MLflow experiment training logs to: one default for the stages and the
# pipeline. The components repeat it as a literal, because KFP embeds a component's source, signature included,
# in the compiled pipeline, where no import runs first; tests/test_settings_parity.py checks that they agree.
MODEL_NAME = "animl-classifier"


class StageConfig(BaseModel):
    """Base for every stage's configuration: unknown fields are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @classmethod
    def build(cls, **values: Any):
        """Validate ``values`` into a config, turning pydantic's error into a readable PipelineError."""
        try:
            return cls(**values)
        except ValidationError as e:
            lines = [
                f"  --{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}" for err in e.errors()
            ]
            raise PipelineError(f"invalid {cls.__name__} settings:\n" + "\n".join(lines)) from e


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, model: type[StageConfig]) -> None:
    """Add one ``--flag`` per field of ``model`` to ``parser``."""
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = _unwrap_optional(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "help": field.description or ""}
        if field.is_required():
            kwargs["required"] = True
        else:
            kwargs["default"] = field.default
            kwargs["help"] += f" (default: {field.default})"
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = list(get_args(annotation))
        elif get_origin(annotation) is list:
            kwargs["nargs"] = "*"
            kwargs["type"] = get_args(annotation)[0]
        elif annotation in (int, float, str, Path):
            kwargs["type"] = annotation
        parser.add_argument(flag, **kwargs)


def config_from_args(model: type[StageConfig], args: argparse.Namespace):
    """Build ``model`` from the parsed flags that belong to it."""
    return model.build(**{name: getattr(args, name) for name in model.model_fields})
