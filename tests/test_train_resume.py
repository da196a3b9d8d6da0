"""Preemption: a training process killed mid-epoch and started again ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from animl_retrain.formats import layout
from animl_retrain.modeling.checkpoint import load_checkpoint
from animl_retrain.stages import train

pytestmark = pytest.mark.server
SETTINGS = {"arch": "mobilenet_v3_small", "image_size": 32, "epochs": 2, "batch_size": 8, "checkpoint_every_steps": 2}
TOLERANCE = 1e-6  # on CPU the resumed run is bitwise identical; the tolerance allows for other BLAS builds


def train_command(stage_outputs, out, checkpoint_uri, workers):
    flags = {**SETTINGS, "workers": workers, "experiment": "resume-tests", "checkpoint_uri": checkpoint_uri}
    cmd = [sys.executable, "-m", "animl_retrain.cli", "train", "--out", str(out)]
    cmd += ["--crops", str(stage_outputs["crops"]), "--split", str(stage_outputs["split"])]
    return cmd + [arg for k, v in flags.items() for arg in ("--" + k.replace("_", "-"), str(v))]


def finish(cmd, timeout=300) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{\n") :])  # MLflow prints its run links before the result


def read_s3_json(s3, bucket, key):
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def kill_mid_epoch(cmd, s3, bucket, prefix, timeout=300) -> tuple[dict, str]:
    """Start training; SIGKILL it as soon as a checkpoint inside epoch 2 exists; return that progress and run id."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            progress = read_s3_json(s3, bucket, f"{prefix}/progress.json")
            if progress and progress["epoch"] == 2 and progress["step"] > 0:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return progress, read_s3_json(s3, bucket, f"{prefix}/run.json")["run_id"]
            time.sleep(0.1)
        raise AssertionError(f"no mid-epoch checkpoint appeared (exit status {proc.poll()})")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_killed_training_resumes_to_the_same_result_in_the_same_mlflow_run(stage_outputs, s3, bucket, tmp_path):
    import mlflow

    straight = train.run(
        train.TrainConfig(
            crops=stage_outputs["crops"],
            split=stage_outputs["split"],
            out=tmp_path / "straight",
            workers=0,
            experiment="resume-tests",
            checkpoint_uri=f"s3://{bucket}/straight",
            **SETTINGS,
        )
    ).model_dump()
    assert straight["resumed_from"] == ""

    cmd = train_command(stage_outputs, tmp_path / "resumed", f"s3://{bucket}/killed", workers=2)
    progress, first_run_id = kill_mid_epoch(cmd, s3, bucket, "killed")
    assert not (tmp_path / "resumed" / layout.MODEL_FILE).exists()
    resumed = finish(cmd)

    assert resumed["resumed_from"].startswith("epoch 2 step ")
    assert resumed["mlflow_run_id"] == first_run_id  # the same MLflow run, not a second one
    assert resumed["best_epoch"] == straight["best_epoch"] and resumed["epochs_run"] == straight["epochs_run"] == 2
    for key, value in straight["best"].items():
        assert resumed["best"][key] == pytest.approx(value, abs=TOLERANCE)
    a = load_checkpoint(tmp_path / "straight" / layout.MODEL_FILE)["state_dict"]
    b = load_checkpoint(tmp_path / "resumed" / layout.MODEL_FILE)["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=TOLERANCE, rtol=0) for k in a)

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("resume-tests").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([straight["mlflow_run_id"], first_run_id])
    run = client.get_run(first_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from"] == resumed["resumed_from"]
    for metric in ("train_loss", "val_macro_f1"):
        assert sorted({m.step for m in client.get_metric_history(first_run_id, metric)}) == [1, 2]
    straight_curve = [m.value for m in client.get_metric_history(straight["mlflow_run_id"], "train_loss")]
    resumed_curve = {m.step: m.value for m in client.get_metric_history(first_run_id, "train_loss")}
    assert [resumed_curve[s] for s in (1, 2)] == pytest.approx(straight_curve, abs=TOLERANCE)
    assert progress["epoch"] == 2


def test_resuming_with_other_settings_is_refused(stage_outputs, bucket, tmp_path, servers):
    from animl_retrain.core.errors import PipelineError

    base = {
        "crops": stage_outputs["crops"],
        "split": stage_outputs["split"],
        "arch": "mobilenet_v3_small",
        "image_size": 32,
        "epochs": 1,
        "batch_size": 16,
        "workers": 0,
        "experiment": "resume-tests-2",
        "checkpoint_uri": f"s3://{bucket}/ck",
        "log_system_metrics": False,
    }
    done = train.run(train.TrainConfig(out=tmp_path / "a", **base))
    again = train.run(train.TrainConfig(out=tmp_path / "b", **base))  # finished checkpoint: nothing to train
    assert again.mlflow_run_id == done.mlflow_run_id and again.resumed_from == "epoch 2 step 0"
    with pytest.raises(PipelineError, match=r"other settings \(lr: 0.001 -> 0.01\)"):
        train.run(train.TrainConfig(out=tmp_path / "c", **{**base, "lr": 0.01}))
