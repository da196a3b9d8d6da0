"""Faults injected into real runs: the S3 server killed mid-download, stages killed mid-write, a full disk.

Each test is bounded in time and stops what it started by PID (or the process group a recorded PID leads), in a
``finally`` so that a failing test cleans up too. What "survived" and "lost nothing" mean for each is written
beside it and counted in docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from animl_retrain.core.io import read_json
from animl_retrain.formats import layout, tables
from animl_retrain.stages import crop, download, export, split
from animl_retrain.tools import services
from animl_retrain.vision.images import verify_image
from tests.conftest import TEST_SPEC

CLI = [sys.executable, "-m", "animl_retrain.cli"]
DEADLINE = 120  # seconds any one process of these tests may take


def start(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """A CLI stage in a process group of its own (so that it and its workers can be killed together)."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(
        [*CLI, *args],
        stdout=out,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads, and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_until(condition, proc: subprocess.Popen | None = None, timeout: float = DEADLINE) -> bool:
    """Poll ``condition`` until it holds, ``proc`` exits or ``timeout`` passes; return whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return condition()
        time.sleep(0.002)
    return False


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.part")]


# --- the S3 server killed in the middle of a download, then restarted -------------------------------------------

N_OBJECTS = 160


def noisy_jpeg(i: int) -> bytes:
    """A ~60 KB JPEG, different for every ``i``."""
    import io

    pixels = np.random.default_rng(i).integers(0, 256, (160, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.server
def test_s3_killed_mid_download_then_restarted_resumes_and_loses_nothing(tmp_path, monkeypatch):
    state = tmp_path / "state"
    svc = services.start(state, mlflow=False)  # a SeaweedFS of this test's own: it is going to be killed
    try:
        env = services.client_env(svc)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        s3 = services.s3_admin_client(svc)
        s3.create_bucket(Bucket="images")
        blobs = {}
        data = {"categories": [{"id": 1, "name": "fox"}], "images": [], "annotations": []}
        for i in range(N_OBJECTS):
            key, file = f"original/p:{i:04d}-original.jpg", f"p/cam{i % 4}/p-{i:04d}.jpg"
            blobs[file] = (key, noisy_jpeg(i))
            s3.put_object(Bucket="images", Key=key, Body=blobs[file][1])
            data["images"].append({"id": f"p:{i:04d}", "file_name": file, "serving_bucket_key": key, "location": "a"})
            data["annotations"].append(
                {"id": f"a{i}", "image_id": f"p:{i:04d}", "category_id": 1, "bbox": [1, 1, 9, 9]}
            )
        (tmp_path / "export.json").write_text(json.dumps(data))
        export.run(export.ExportConfig(source=str(tmp_path / "export.json"), label_spec=TEST_SPEC, out=tmp_path / "e"))

        out = tmp_path / "img"
        images = out / layout.IMAGES_DIR
        args = ["download", "--export", str(tmp_path / "e"), "--images-uri", "s3://images", "--out", str(out)]
        proc = start([*args, "--workers", "2", "--retries", "1"], env, log=tmp_path / "first.log")
        try:
            landed = wait_until(lambda: sum(1 for _ in images.rglob("*.jpg")) >= 12 if images.is_dir() else False, proc)
            assert landed and proc.poll() is None, "the download ended before the server could be killed"
            os.killpg(services.status(state)["seaweedfs"], signal.SIGKILL)  # the whole server, mid-transfer
            proc.wait(timeout=DEADLINE)
        finally:
            kill_group(proc)
        services.stop(state)  # reaps the killed server and clears its PID file
        log = (tmp_path / "first.log").read_text()
        assert proc.returncode == 2, log[-3000:]
        assert "images could not be fetched" in log and "re-run to resume" in log

        # Lost nothing: every file under its final name is whole and equal to its object; the table and the
        # report say exactly which images are on disk and which failed.
        on_disk = {str(p.relative_to(images)): p for p in images.rglob("*") if p.is_file()}
        assert 12 <= len(on_disk) < N_OBJECTS and not partial_files(out)
        for name, path in on_disk.items():
            assert hashlib.md5(path.read_bytes()).digest() == hashlib.md5(blobs[name][1]).digest(), name
        assert set(tables.read_table(out / "images.csv", tables.IMAGES)["file"]) == set(on_disk)
        counts = read_json(out / "report.json")["counts"]
        assert counts["downloaded"] == len(on_disk) and counts["failed"] == N_OBJECTS - len(on_disk)
        mtimes = {name: path.stat().st_mtime_ns for name, path in on_disk.items()}

        restarted = services.start(state, mlflow=False)  # the same data folder (and ports, unless one was taken)
        for key, value in services.client_env(restarted).items():
            monkeypatch.setenv(key, value)
        second = download.run(download.DownloadConfig(export=tmp_path / "e", images_uri="s3://images", out=out))
        assert (second.already_present, second.downloaded) == (len(on_disk), N_OBJECTS - len(on_disk))
        assert (second.missing, second.corrupt) == (0, 0)
        assert {name: (images / name).stat().st_mtime_ns for name in mtimes} == mtimes  # not fetched again
        for name, (_, body) in blobs.items():
            assert hashlib.md5((images / name).read_bytes()).digest() == hashlib.md5(body).digest(), name
        assert len(tables.read_table(out / "images.csv", tables.IMAGES)) == N_OBJECTS and not partial_files(out)
    finally:
        services.stop(state)


# --- stages killed mid-write -------------------------------------------------------------------------------------


def crop_args(stage_outputs, out: Path) -> list[str]:
    return [
        "crop", "--images", str(stage_outputs["images"]), "--ground-truth", str(stage_outputs["ground_truth"]),
        "--out", str(out), "--crop-size", "32", "--workers", "1",
    ]  # fmt: skip


@pytest.mark.parametrize("seed", [1, 2])
def test_crop_killed_mid_write_reruns_to_the_same_outputs(stage_outputs, tmp_path, seed):
    reference = stage_outputs["crops"]
    expected = files_under(reference / layout.CROPS_DIR)
    kill_after = random.Random(seed).randint(1, len(expected) // 2)  # crops on disk when the kill comes
    out = tmp_path / "crops"
    proc = start(crop_args(stage_outputs, out))
    try:
        wait_until(lambda: sum(1 for _ in (out / layout.CROPS_DIR).rglob("*.jpg")) >= kill_after, proc)
        assert proc.poll() is None, "the crop stage ended before it could be killed"
        kill_group(proc)
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    # No partial file under a final name: every crop there is byte-identical to the uninterrupted run's.
    written = files_under(out / layout.CROPS_DIR)
    finished = {k: v for k, v in written.items() if not k.endswith(".part")}
    assert finished and all(expected[k] == v for k, v in finished.items())
    assert not (out / "crops.csv").exists() and not (out / "report.json").exists()

    result = crop.run(
        crop.CropConfig(
            images=stage_outputs["images"], ground_truth=stage_outputs["ground_truth"], out=out, crop_size=32, workers=1
        )
    )
    assert result.crops == len(expected)
    assert files_under(out / layout.CROPS_DIR) == expected  # leftover .part files of the killed run removed too
    assert (out / "crops.csv").read_bytes() == (reference / "crops.csv").read_bytes()
    for path in (out / layout.CROPS_DIR).rglob("*.jpg"):
        verify_image(path)


SPLIT_TRIALS = 400_000  # a few seconds of work: long enough to be killed at a random point in it


@pytest.fixture(scope="module")
def split_reference(stage_outputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("split-ref")
    split.run(split.SplitConfig(crops=stage_outputs["crops"], out=out, min_locs=2, trials=SPLIT_TRIALS))
    return {name: (out / name).read_bytes() for name in ("split.csv", "label_index.json")}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_split_killed_at_a_random_point_reruns_to_the_same_outputs(stage_outputs, split_reference, tmp_path, seed):
    out = tmp_path / "split"
    args = ["split", "--crops", str(stage_outputs["crops"]), "--out", str(out), "--min-locs", "2"]
    proc = start([*args, "--trials", str(SPLIT_TRIALS)])
    try:
        time.sleep(random.Random(seed).uniform(0.5, 4.0))  # interpreter start, reading, searching or writing
    finally:
        kill_group(proc)
    for name, data in split_reference.items():  # a file is there whole, or not at all
        assert not (out / name).exists() or (out / name).read_bytes() == data
    split.run(split.SplitConfig(crops=stage_outputs["crops"], out=out, min_locs=2, trials=SPLIT_TRIALS))
    assert {name: (out / name).read_bytes() for name in split_reference} == split_reference
    assert not partial_files(out) or all(p.name.startswith(".") for p in partial_files(out))


# --- a full disk while writing crops -----------------------------------------------------------------------------


def _can_mount_tmpfs() -> str | None:
    """None if this user may mount a tmpfs in a user namespace of its own, else why not."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        timeout=30,
    )
    return None if probe.returncode == 0 else f"no user+mount namespaces here: {probe.stderr.decode().strip()}"


def test_disk_full_while_writing_crops_is_a_clear_error_and_corrupts_nothing(stage_outputs, tmp_path):
    reason = _can_mount_tmpfs()
    if reason:
        pytest.skip(reason)
    reference = stage_outputs["crops"]
    expected = files_under(reference / layout.CROPS_DIR)
    size_kb = max(8, sum(len(v) for v in expected.values()) // 1024 // 3)  # room for about a third of the crops
    out, kept = tmp_path / "full", tmp_path / "kept"
    out.mkdir()
    args = " ".join(f"'{a}'" for a in [*CLI, *crop_args(stage_outputs, out)])
    script = f"""
set -u
mount -t tmpfs -o size={size_kb}k tmpfs '{out}'
{args} > '{tmp_path}/full.log' 2>&1; echo $? > '{tmp_path}/full.rc'
cp -a '{out}/.' '{kept}/'
mount -o remount,size=64m '{out}'
{args} > '{tmp_path}/rerun.log' 2>&1; echo $? > '{tmp_path}/rerun.rc'
mkdir -p '{tmp_path}/after' && cp -a '{out}/.' '{tmp_path}/after/'
"""
    kept.mkdir()
    subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], timeout=2 * DEADLINE, check=True
    )
    log = (tmp_path / "full.log").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "2", log[-3000:]
    [line] = [x for x in log.splitlines() if x.startswith("error:")]
    assert "no space left on device" in line and str(out) in line and "re-run" in line
    # Nothing corrupted: no table or report claims the run finished, and every crop on the full disk is whole
    written = files_under(kept / layout.CROPS_DIR) if (kept / layout.CROPS_DIR).is_dir() else {}
    assert not (kept / "crops.csv").exists() and not (kept / "report.json").exists()
    assert not [k for k in written if k.endswith(".part")]
    assert all(expected[k] == v for k, v in written.items()) and len(written) < len(expected)

    # With space again, a re-run completes and gives the uninterrupted run's outputs.
    after = tmp_path / "after"
    assert (tmp_path / "rerun.rc").read_text().strip() == "0", (tmp_path / "rerun.log").read_text()[-3000:]
    assert files_under(after / layout.CROPS_DIR) == expected
    assert (after / "crops.csv").read_bytes() == (reference / "crops.csv").read_bytes()
