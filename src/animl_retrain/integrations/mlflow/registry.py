"""The MLflow model registry: the one champion lookup, registration and promotion, and fetching checkpoints.

:func:`champion` is the only way the package asks which version holds an alias: export (incremental mode),
evaluate (scoring the champion), register (promotion and settling races) and deploy all go through it, with one
rule: a model or alias that does not exist is ``None``, any other failure is an error (a champion that cannot
be read is never taken for no champion).

The registered pyfunc model (:mod:`animl_retrain.integrations.mlflow.pyfunc`) carries the training checkpoint as its
``checkpoint`` artifact (the model's ``MLmodel`` file says where); the checkpoint holds the architecture,
the label index and the preprocessing, so it is all a deployment or a local prediction needs.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import write_json
from animl_retrain.core.logging import log, redact_url
from animl_retrain.formats.model_folder import INFO_FILE, LABEL_INDEX_FILE, MODEL_FILES, PREPROCESSING_FILE
from animl_retrain.integrations.mlflow import tracking
from animl_retrain.modeling.checkpoint import load_checkpoint

CHAMPION, CHALLENGER = "champion", "challenger"
COMPARED_TAG, DECISION_TAG = "champion_compared", "promotion"  # what a version was compared with, and the verdict


@dataclass(frozen=True)
class RegisteredVersion:
    """What the registry says about one version of a registered model."""

    version: str
    run_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def champion(name: str, alias: str = CHAMPION, timeout: float = 15.0) -> RegisteredVersion | None:
    """The version of ``name`` holding ``alias`` (the champion by default), or None if the model or alias is absent.

    With the mlflow package it asks through MLflow's client; without it (the CPU image's export stage) through the
    server's REST API (``GET /api/2.0/mlflow/registered-models/alias``, with ``MLFLOW_TRACKING_TOKEN`` or
    ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``). Either way, any failure other than "not found" raises.
    """
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return _champion_by_rest(name, alias, timeout)
    return _champion_by_client(name, alias)


def _champion_by_client(name: str, alias: str) -> RegisteredVersion | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mv = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as e:
        # No such model: RESOURCE_DOES_NOT_EXIST; no such alias: INVALID_PARAMETER_VALUE "... not found".
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
            e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in e.message
        ):
            return None
        raise PipelineError(
            f"MLflow {redact_url(tracking.tracking_uri())}: cannot read {name}@{alias}: {e.message}"
        ) from None
    return RegisteredVersion(version=str(mv.version), run_id=mv.run_id or "", tags=dict(mv.tags))


def _champion_by_rest(name: str, alias: str, timeout: float = 15.0) -> RegisteredVersion | None:
    uri = tracking.tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise PipelineError(f"MLFLOW_TRACKING_URI {redact_url(uri)} is not an http(s) tracking server")
    query = urllib.parse.urlencode({"name": name, "alias": alias})
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/registered-models/alias?{query}")
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            version = json.loads(resp.read()).get("model_version") or {}
    except urllib.error.HTTPError as e:
        body = e.read()[:1000].decode("utf-8", "replace")
        if e.code == 404 or "RESOURCE_DOES_NOT_EXIST" in body or (e.code == 400 and "not found" in body):
            return None
        raise PipelineError(f"MLflow {redact_url(uri)}: cannot read {name}@{alias}: HTTP {e.code} {body}") from None
    except (urllib.error.URLError, OSError) as e:
        raise PipelineError(f"MLflow {redact_url(uri)} is not reachable to read {name}@{alias}: {e}") from None
    if not version:
        return None
    tags = {t["key"]: t.get("value", "") for t in version.get("tags") or []}
    return RegisteredVersion(version=str(version.get("version", "")), run_id=version.get("run_id", ""), tags=tags)


def load_model(name: str, version: str):
    """The registered pyfunc model of a version, loaded in this process."""
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{name}/{version}")


def register(name: str, run_id: str, checkpoint: Path, tags: dict[str, str]) -> str:
    """Log ``checkpoint`` as the pyfunc model into run ``run_id``, register it with ``tags``, alias it challenger.

    The run gets the tags too, except the bulky label index and preprocessing. Returns the new version.
    """
    import mlflow

    from animl_retrain.integrations.mlflow.pyfunc import log_model

    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({k: v for k, v in tags.items() if k not in ("label_index", "preprocessing")})
        info = log_model(checkpoint)
    version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
    mlflow.MlflowClient().set_registered_model_alias(name, CHALLENGER, version)
    return version


def record_decision(name: str, version: str, compared: RegisteredVersion | None, promoted: bool) -> None:
    """Tag what ``version`` was compared with and the verdict, before any alias moves (see :func:`settle`)."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, COMPARED_TAG, compared.version if compared else "none")
    client.set_model_version_tag(name, version, DECISION_TAG, "promoted" if promoted else "kept")


def promote(name: str, version: str) -> str:
    """Give ``version`` the champion alias, then :func:`settle` races; returns the version that is champion."""
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(name, CHAMPION, version)
    return settle(name, version)


def settle(name: str, version: str, rounds: int = 3, pause: float = 0.5) -> str:
    """After ``version`` took the champion alias: undo a lost race with a concurrent registration; return the champion.

    Two runs finishing together can both read the same champion, both beat it, and both move the alias: the last
    to move it wins, even when it is the worse model. So every run that promotes looks again: among the versions
    that were compared with the same champion on the same test set and decided to promote (tags
    ``champion_compared``, ``test_fingerprint``, ``promotion``, all set before the alias moved), the best test
    macro-F1 (the earliest version on a tie) gets the alias. Whichever run moved the alias last settles last and
    sees all of them. A champion that has left the group since (a later run, or a person) is left alone.
    """
    import mlflow

    client = mlflow.MlflowClient()
    mine = client.get_model_version(name, version)
    group = {key: mine.tags.get(key, "") for key in (COMPARED_TAG, "test_fingerprint")}
    query = " and ".join(
        [f"name='{name}'", f"tags.{DECISION_TAG}='promoted'"]
        + [f"tags.{key}='{value}'" for key, value in group.items()]
    )
    settled = str(version)
    for attempt in range(rounds):
        current = champion(name)
        if current is None:
            return settled
        contenders = {str(v.version): v for v in client.search_model_versions(query)}
        if current.version not in contenders:
            return current.version
        best = max(contenders.values(), key=lambda v: (_score(v), -int(v.version)))
        settled = str(best.version)
        if settled != current.version:
            log.warning(
                "register: concurrent registrations: champion v%s -> v%s (better on the same test set)",
                current.version,
                settled,
            )
            client.set_registered_model_alias(name, CHAMPION, settled)
        elif attempt:
            return settled
        time.sleep(pause)
    return settled


def _score(version) -> float:
    value = float(version.tags.get("test_macro_f1", "nan"))
    return value if math.isfinite(value) else -1.0


def tags_with_run(mv) -> dict[str, str]:
    """A model version's tags over its training run's (where evaluate records thresholds); the run is optional."""
    import mlflow

    try:
        run_tags = dict(mlflow.get_run(mv.run_id).data.tags) if mv.run_id else {}
    except Exception as e:  # thresholds are optional; a missing run must not stop a deployment
        log.warning("deploy: cannot read the tags of run %s: %s", mv.run_id, e)
        run_tags = {}
    return run_tags | dict(mv.tags)


def record_deployment(name: str, version: str, stage: str, details: dict[str, str]) -> None:
    """Record a deployment on the model version: ``deployed_<stage>_<key>`` tags and a ``deployed-<stage>`` alias."""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in details.items():
        client.set_model_version_tag(name, version, f"deployed_{stage}_{key}", value)
    client.set_registered_model_alias(name, f"deployed-{stage}", version)


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
