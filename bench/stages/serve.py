"""Serve: Animl handler latency per request on CPU, our model (TorchScript and ONNX Runtime) vs a MIRAv2-like one.

Ours is the pipeline's default model (EfficientNet-B0 at 224 px); the baseline is shaped like TNC's MIRAv2
(EfficientNet-B3 at 300 px, TorchScript). Weights are random (latency does not depend on them). Every request
goes through the whole handler: JSON parse, base64 decode, JPEG decode, square crop, resize, normalise,
forward pass, softmax, response dict. Each variant runs with 2 inference threads (as on a small serverless
worker, and as asked) and with 1; all six take turns request by request so that the shared machine's load hits
them alike. On a loaded shared machine torch's OpenMP pool with 2 threads on 2 busy cores can be several times
slower than with 1 (threads spin at barriers while the other core is taken); ONNX Runtime suffers less.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from animl_retrain.modeling.backbones import build_model
from animl_retrain.modeling.checkpoint import save_checkpoint
from animl_retrain.serving import export as model_export
from animl_retrain.serving import http as serving
from animl_retrain.vision.preprocessing import Preprocessing

STAGE = "serve"
THREADS = (2, 1)
LABELS = ["bird", "fox", "lizard", "rodent", "skunk"]
BASELINE = "MIRAv2-like EfficientNet-B3 @300 px, TorchScript"


def _frames(ctx) -> tuple[list[bytes], str]:
    """Full-size camera-trap frames: real ones from --research-data if given, else synthetic 2048x1536 JPEGs."""
    if ctx.research_data:
        found = sorted(Path(ctx.research_data, "animl-ml").rglob("*.jpg"))[:6]
        if found:
            return [p.read_bytes() for p in found], f"{len(found)} real Animl frames (research data animl-ml/)"
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(4):
        base = np.linspace(0, 255, 2048, dtype=np.float32)[None, :, None] * np.ones((1536, 1, 3), np.float32)
        noisy = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
        frames.append(buf.getvalue())
    return frames, "4 synthetic 2048x1536 JPEG frames"


def _model_folder(ctx, arch: str, size: int, images: list[Path]) -> Path:
    import torch

    torch.manual_seed(0)
    folder = ctx.work / f"{arch}-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "ckpt.pt", build_model(arch, len(LABELS)), arch, LABELS, Preprocessing(image_size=size))
    model_export.export_model_folder(folder / "ckpt.pt", folder, images)
    return folder


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def run(ctx):
    """p50/p95 handler latency of three models/backends at 2 and 1 threads, interleaved request by request."""
    import torch

    frames, frames_text = _frames(ctx)
    check = ctx.work / "check"
    check.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        (check / f"{i}.jpg").write_bytes(frame)
    images = sorted(check.glob("*.jpg"))
    ours = _model_folder(ctx, "efficientnet_b0", 224, images)
    mira = _model_folder(ctx, "efficientnet_b3", 300, images)
    variants = {}  # (name, threads) -> handler
    for threads in THREADS:
        variants["ours-torchscript", threads] = serving.AnimlHandler(serving.load_classifier(ours, "torchscript"))
        variants["ours-onnx", threads] = serving.AnimlHandler(serving.load_classifier(ours, "onnx", threads))
        variants["baseline", threads] = serving.AnimlHandler(serving.load_classifier(mira, "torchscript"))
    rng = np.random.default_rng(1)
    requests = []
    for i in range(8 if ctx.quick else 40):
        y, x = rng.uniform(0, 0.6, 2)
        box = [y, x, y + rng.uniform(0.1, 0.4), x + rng.uniform(0.1, 0.4)]
        image = base64.b64encode(frames[i % len(frames)]).decode()
        requests.append(json.dumps({"image": image, "bbox": [round(v, 4) for v in box]}).encode())
    times: dict[tuple[str, int], list[float]] = {key: [] for key in variants}
    for n, body in enumerate(requests[:3] + requests):  # the first three rounds warm up, untimed
        for (name, threads), handler in variants.items():
            torch.set_num_threads(threads)
            start = time.perf_counter()
            handler.predict(body)
            if n >= 3:
                times[name, threads].append((time.perf_counter() - start) * 1000)

    size_mb = {p.name: (p / "model.torchscript.pt").stat().st_size / 1e6 for p in (ours, mira)}
    rows = []
    for threads in THREADS:
        text = f"{len(requests)} requests each, {frames_text}, {threads} thread(s); ours = EfficientNet-B0 @224 px"
        for backend, key in (("TorchScript", "ours-torchscript"), ("ONNX Runtime", "ours-onnx")):
            for q in (50, 95):
                rows.append(
                    ctx.row(
                        stage=STAGE,
                        metric=f"handler latency p{q}, {backend}, {threads} thread(s)",
                        unit="ms",
                        ours=_percentile(times[key, threads], q),
                        alternative=BASELINE,
                        alternative_value=_percentile(times["baseline", threads], q),
                        higher_is_better=False,
                        input=text,
                    )
                )
        rows.append(
            ctx.row(
                stage=STAGE,
                metric=f"ONNX Runtime vs TorchScript, p50, {threads} thread(s), same model",
                unit="ms",
                ours=statistics.median(times["ours-onnx", threads]),
                alternative="our model, TorchScript",
                alternative_value=statistics.median(times["ours-torchscript", threads]),
                higher_is_better=False,
                input=text,
            )
        )
    rows.append(
        ctx.row(
            stage=STAGE,
            metric="TorchScript model size",
            unit="MB",
            ours=size_mb[ours.name],
            alternative=BASELINE,
            alternative_value=size_mb[mira.name],
            higher_is_better=False,
            input="serialized model in the .mar (random weights, 5 classes)",
        )
    )
    return rows
