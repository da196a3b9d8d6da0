"""Checkpoints of a model: the self-describing model file (``model.pt``) and the resume checkpoint of training.

**The model file** (:func:`save_checkpoint`): weights, architecture, labels and preprocessing, everything
evaluation, export, registration and serving need to rebuild the model (:func:`model_from_checkpoint`).

**Resume checkpoints**: training survives a killed pod (spot GPU nodes) and continues where it stopped.

A checkpoint location (a folder or an ``s3://`` prefix, one per training run) holds:

- ``run.json``: the MLflow run id, written as soon as the run exists, so a restart logs into the same run;
- ``resume.pt``: everything needed to continue exactly: model, optimiser, LR schedule, gradient scaler, RNG
  states, epoch and step, the running loss of the unfinished epoch, the best epoch's weights and metrics, the
  per-epoch history, and the settings and data it was made with (a restart with other settings or data is
  refused rather than silently mixed);
- ``progress.json``: epoch and step of the last checkpoint, for people and monitors.

The location is a :class:`~animl_retrain.core.resumable.ResumableStore`: every file is replaced whole (an atomic
rename locally, a single PUT on S3), so a kill while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from animl_retrain.core import storage
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import atomic_path
from animl_retrain.core.logging import log
from animl_retrain.core.resumable import ResumableStore, check_settings
from animl_retrain.vision.preprocessing import Preprocessing

CHECKPOINT_FORMAT = "animl-retrain-checkpoint/1"
RESUME_FORMAT = "animl-retrain-resume/1"
RESUME_FILE, RUN_FILE, PROGRESS_FILE = "resume.pt", "run.json", "progress.json"
# Settings that may change between an interrupted run and its restart without changing the result.
FREE_SETTINGS = {
    "crops",
    "split",
    "out",
    "workers",
    "device",
    "checkpoint_uri",
    "checkpoint_every_steps",
    "log_system_metrics",
    "run_name",
    "kfp_run_id",
}


def save_checkpoint(
    path: Path, model, arch: str, labels: list[str], preprocessing: Preprocessing, **extra: Any
) -> None:
    """Write a checkpoint that says everything needed to rebuild, evaluate and serve the model."""
    import torch

    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "labels": list(labels),
        "preprocessing": preprocessing.to_json(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    import torch

    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise PipelineError(f"checkpoint not found: {path}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise PipelineError(f"{path} is not a checkpoint of this project ({CHECKPOINT_FORMAT})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]):
    """Rebuild the model of a checkpoint, in eval mode, with its :class:`Preprocessing` and labels."""
    from animl_retrain.modeling.backbones import build_model

    model = build_model(ckpt["arch"], len(ckpt["labels"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, Preprocessing.from_json(ckpt["preprocessing"]), list(ckpt["labels"])


def run_location(base: str, kfp_run_id: str) -> str:
    """The checkpoint location of one run: ``base`` itself, or ``base/<kfp run id>/train`` inside a pipeline."""
    if not base or not kfp_run_id:
        return base
    return storage.join(storage.join(base, kfp_run_id), "train")


def settings_key(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint is only valid for."""
    return {k: v for k, v in sorted(config.items()) if k not in FREE_SETTINGS}


def data_key(labels: list[str], train: list[tuple[str, str]], val: list[tuple[str, str]]) -> str:
    """A fingerprint of the label list and the train/val crops with their labels."""
    h = hashlib.sha256(json.dumps([labels, sorted(train), sorted(val)]).encode())
    return h.hexdigest()[:16]


class ResumeStore:
    """Reads and writes the checkpoints of one training run at ``uri`` (a :class:`ResumableStore`)."""

    def __init__(self, uri: str):
        self.store = ResumableStore(uri, "checkpoint")
        self.uri = uri

    def run_id(self) -> str | None:
        """The MLflow run id recorded by an earlier attempt, if any."""
        if not self.store.exists(RUN_FILE):
            return None
        record = self.store.read_json(RUN_FILE)
        if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
            raise PipelineError(f"{self.store.path(RUN_FILE)} is not a run record; delete it to start afresh")
        return record["run_id"]

    def write_run_id(self, run_id: str) -> None:
        """Record the MLflow run id."""
        self.store.write_json(RUN_FILE, {"run_id": run_id})

    def load(self) -> dict[str, Any] | None:
        """The last checkpoint, or None when there is none yet."""
        import torch

        if not self.store.exists(RESUME_FILE):
            return None
        uri = self.store.path(RESUME_FILE)
        with tempfile.TemporaryDirectory(prefix="animl-resume-") as tmp:
            local = self.store.download(RESUME_FILE, Path(tmp) / RESUME_FILE)
            try:
                state = torch.load(local, map_location="cpu", weights_only=True)
            except Exception as e:
                raise PipelineError(f"cannot read the resume checkpoint {uri}: {e}; delete it to start afresh") from e
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            raise PipelineError(f"{uri} is not a resume checkpoint of this project ({RESUME_FORMAT})")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Replace the checkpoint and the progress record."""
        import torch

        with tempfile.TemporaryDirectory(prefix="animl-resume-") as tmp:
            local = Path(tmp) / RESUME_FILE
            torch.save({"format": RESUME_FORMAT, **state}, local)
            self.store.upload(RESUME_FILE, local)
        progress = {"epoch": state["epoch"], "step": state["step"], "finished": state.get("finished", False)}
        self.store.write_json(PROGRESS_FILE, progress)
        log.debug("train: checkpoint at epoch %d step %d -> %s", state["epoch"], state["step"], self.uri)


def check_compatible(state: dict[str, Any], settings: dict[str, Any], data: str, uri: str) -> None:
    """Refuse to resume a checkpoint made with other settings or other data."""
    check_settings(state["settings"], settings, f"the checkpoint at {uri}")
    if state["data"] != data:
        raise PipelineError(
            f"the checkpoint at {uri} was made from other train/val data (fingerprint {state['data']}, now {data}); "
            "use a new checkpoint location"
        )


def snapshot(parts, progress, settings: dict, data: str, run_id: str) -> dict[str, Any]:
    """Everything a resumed run needs: the run's state (model, optimiser, schedule, scaler, RNGs) and progress."""
    import torch

    return {
        "settings": settings,
        "data": data,
        "mlflow_run_id": run_id,
        "epoch": progress.epoch,
        "step": progress.step,
        "finished": progress.finished,
        "progress": {k: v for k, v in progress.__dict__.items() if k != "best_state"},
        "best_state": progress.best_state,
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore(state: dict[str, Any], parts):
    """Load a resume checkpoint into ``parts``; returns its progress."""
    import torch

    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    from animl_retrain.modeling.training import Progress

    progress = Progress(**state["progress"])
    progress.best_state = state["best_state"]
    return progress
