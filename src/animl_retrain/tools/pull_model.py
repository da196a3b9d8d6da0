"""pull-model: fetch a registered model (checkpoint, label index, preprocessing) from MLflow into a folder.

The folder is a model folder that ``predict`` and ``serve`` read (backend ``pytorch``); ``model.json`` records
the registered name, version, aliases, run and tags it came from.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from animl_retrain.config import StageConfig
from animl_retrain.integrations.mlflow import registry


class PullModelConfig(StageConfig):
    """Settings of pull-model."""

    name: str = Field(min_length=1, description="registered model name in MLflow")
    out: Path = Field(description="folder to write the model into")
    alias: str = Field("champion", description="alias to fetch (ignored when --version is given)")
    version: str = Field("", description="model version number to fetch")


class PullModelResult(BaseModel):
    """What was fetched."""

    name: str
    version: str
    aliases: list[str]
    labels: list[str]
    folder: str


def run(cfg: PullModelConfig) -> PullModelResult:
    """Fetch the model into ``cfg.out``."""
    info = registry.pull(cfg.name, Path(cfg.out), alias=cfg.alias, version=cfg.version)
    return PullModelResult(
        name=info["name"], version=info["version"], aliases=info["aliases"], labels=info["labels"], folder=str(cfg.out)
    )
