"""The MLflow model registry, read side: find a model version by alias or number and fetch its checkpoint.

The registered pyfunc model (:mod:`animl_retrain.mlflow_model`) carries the training checkpoint as its
``checkpoint`` artifact (the model's ``MLmodel`` file says where); the checkpoint holds the architecture,
the label index and the preprocessing, so it is all a deployment or a local prediction needs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import write_json
from animl_retrain.formats.model_folder import INFO_FILE, LABEL_INDEX_FILE, MODEL_FILES, PREPROCESSING_FILE
from animl_retrain.integrations.mlflow import tracking
from animl_retrain.modeling.backbones import load_checkpoint


def resolve_version(name: str, alias: str = "", version: str = ""):
    """The registry's ModelVersion for ``version`` if given, else the one holding ``alias``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.check_server()
    client = mlflow.MlflowClient()
    try:
        if version:
            return client.get_model_version(name, str(version))
        if not alias:
            raise PipelineError(f"name a version or an alias of registered model {name!r}")
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        what = f"version {version}" if version else f"alias {alias!r}"
        raise PipelineError(f"registered model {name!r} has no {what}: {e.message}") from e


def aliases_of(version) -> list[str]:
    """The aliases a ModelVersion holds (as the registry reports them)."""
    return sorted(getattr(version, "aliases", None) or [])


def _checkpoint_path(model_dir: Path) -> str:
    """Where the pyfunc model keeps its ``checkpoint`` artifact, as its ``MLmodel`` file records it."""
    import yaml

    try:
        flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
        return flavor["artifacts"]["checkpoint"]["path"]
    except (OSError, KeyError, TypeError) as e:
        raise PipelineError(
            f"{model_dir.name}: not a model registered by this pipeline (no checkpoint artifact)"
        ) from e


def download_checkpoint(name: str, version: str, dest: Path) -> Path:
    """Download the training checkpoint of a registered model version to ``dest``."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="animl-pull-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        source = local / _checkpoint_path(local)
        if not source.is_file():
            raise PipelineError(f"models:/{name}/{version} has no checkpoint file; was it registered by this pipeline?")
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    load_checkpoint(dest)  # refuses anything that is not one of our checkpoints
    return Path(dest)


def pull(name: str, out: Path, alias: str = "champion", version: str = "") -> dict[str, Any]:
    """Fetch a registered model into a model folder: checkpoint, label index, preprocessing and ``model.json``."""
    mv = resolve_version(name, alias, version)
    out = Path(out)
    checkpoint = download_checkpoint(name, mv.version, out / MODEL_FILES["pytorch"])
    ckpt = load_checkpoint(checkpoint)
    labels = list(ckpt["labels"])
    tagged = mv.tags.get("label_index")
    if tagged and [json.loads(tagged)[str(i)] for i in range(len(labels))] != labels:
        raise PipelineError(f"models:/{name}/{mv.version}: the label_index tag disagrees with the checkpoint")
    write_json(out / LABEL_INDEX_FILE, {str(i): label for i, label in enumerate(labels)})
    write_json(out / PREPROCESSING_FILE, ckpt["preprocessing"])
    info = {
        "name": name,
        "version": str(mv.version),
        "aliases": aliases_of(mv),
        "run_id": mv.run_id,
        "source": mv.source,
        "arch": ckpt["arch"],
        "labels": labels,
        "tags": dict(mv.tags),
    }
    write_json(out / INFO_FILE, info)
    return info
