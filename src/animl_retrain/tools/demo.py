"""A deterministic demo Animl project: synthetic camera-trap frames and an Animl-shaped COCO export.

Six classes (fox, skunk, deer mouse, rat, bird, lizard), drawn on distinct "location"
backgrounds (one per camera deployment, some shot at night in infrared grayscale), with the quirks of real
exports: image ids containing ':', categories defined but never used, full-frame ``empty`` boxes, images
without ``width``/``height``, objects nobody reviewed, several animals in one frame, and Animl labels that
the label spec merges (``mouse`` -> deer_mouse, ``scrub jay`` -> bird).

The native/invasive pair is the one Santa Cruz Island's biosecurity work turns on: the native deer mouse and the
invasive black rat, two small brown rodents of the same shape. The rat is darker, greyer and has small ears, a
long thick tail and no white belly; at night in infrared only brightness and shape tell them apart. So the demo's
invasive threshold, chosen on val, meets the confusion that matters: a deer mouse flagged as a rat.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from animl_retrain.core import storage

PROJECT = "demo_island"
CATEGORIES = [
    "empty",
    "animal",
    "fox",
    "skunk",
    "deer mouse",
    "mouse",
    "rat",
    "bird",
    "scrub jay",
    "lizard",
    "deer",
    "cat",
]
SPECIES = ["fox", "skunk", "deer mouse", "mouse", "rat", "bird", "scrub jay", "lizard"]
LABEL_SPEC = {
    "bird": {"dataset_labels": {"animl": ["bird", "scrub jay"]}},
    "deer_mouse": {"dataset_labels": {"animl": ["deer mouse", "mouse"]}},  # native: never flag it
    "fox": {"dataset_labels": {"animl": ["fox"]}},
    "lizard": {"dataset_labels": {"animl": ["lizard"]}},
    "rat": {"dataset_labels": {"animl": ["rat", "black rat"]}, "invasive": True},
    "skunk": {"dataset_labels": {"animl": ["skunk"]}},
}
SITES = [
    "Prisoners Harbor",
    "Scorpion Canyon",
    "China Camp",
    "Cañada Cervada",
    "Pelican Bay",
    "Valley Anchorage",
    "Christy Ranch",
    "Smugglers Cove",
    "Sauces Canyon",
    "Centinela Grade",
    "Laguna Canyon",
    "Potato Harbor",
    "Montañon Ridge",
    "Coches Prietos",
    "Fraser Point",
    "Black Mountain",
    "El Muelle",
    "Willows Anchorage",
]
SIZES = [(1024, 768), (800, 600), (960, 720)]


@dataclass
class DemoResult:
    """Where the demo project was written and what it holds."""

    export_uri: str
    images_uri: str
    label_spec_uri: str
    images: int
    annotations: int
    locations: int


def _background(rng: np.random.Generator, size: tuple[int, int], site: int, night: bool) -> Image.Image:
    """A location's look: its own ground and sky colours, horizon, texture and shrubs (seeded by the site)."""
    srng = np.random.default_rng(1000 + site)
    w, h = size
    ground = srng.integers(60, 200, 3)
    sky = srng.integers(120, 255, 3)
    horizon = int(h * srng.uniform(0.2, 0.5))
    small = np.zeros((h // 8, w // 8, 3), dtype=np.float32)
    small[: horizon // 8] = sky
    small[horizon // 8 :] = ground
    small += srng.normal(0, srng.uniform(6, 30), small.shape) + rng.normal(0, 4, small.shape)
    img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(srng.integers(3, 9))):
        cx, cy = srng.uniform(0, w), srng.uniform(horizon, h)
        r = srng.uniform(20, 90)
        shade = tuple(int(v) for v in np.clip(ground * srng.uniform(0.4, 0.8) + srng.integers(-20, 20, 3), 0, 255))
        draw.ellipse([cx - r * 1.5, cy - r, cx + r * 1.5, cy + r], fill=shade)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    if night:
        img = img.convert("L").point(lambda v: int(v * 0.7 + 20)).convert("RGB")
    return img


def _draw_animal(
    draw: ImageDraw.ImageDraw,
    species: str,
    box: tuple[float, float, float, float],
    rng: np.random.Generator,
    facing: int,
) -> None:
    """Draw one animal filling roughly ``box`` = (x, y, w, h), facing right (1) or left (-1).

    Shapes are given in box units (0..1 across, 0..1 down) and mirrored when the animal faces left.
    """
    x, y, w, h = box

    def px(u: float, v: float) -> tuple[float, float]:
        return x + (u if facing > 0 else 1 - u) * w, y + v * h

    def rect(u0: float, v0: float, u1: float, v1: float) -> list[float]:
        (a, b), (c, d) = px(u0, v0), px(u1, v1)
        return [min(a, c), b, max(a, c), d]

    def colour(rgb: tuple[int, int, int]) -> tuple[int, ...]:
        return tuple(int(np.clip(c + rng.integers(-18, 18), 0, 255)) for c in rgb)

    thick = max(2, int(h * 0.06))
    if species == "fox":
        fur = colour((200, 95, 35))
        draw.ellipse(rect(0.15, 0.35, 0.8, 0.8), fill=fur)
        draw.ellipse(rect(0.65, 0.15, 0.95, 0.5), fill=fur)
        for e in (0.7, 0.84):
            draw.polygon([px(e, 0.2), px(e + 0.06, 0.0), px(e + 0.1, 0.2)], fill=fur)
        draw.ellipse(rect(0.0, 0.45, 0.3, 0.7), fill=colour((230, 225, 215)))
        for leg in (0.25, 0.4, 0.6, 0.72):
            draw.rectangle(rect(leg, 0.75, leg + 0.05, 1.0), fill=(40, 30, 25))
    elif species == "skunk":
        draw.ellipse(rect(0.0, 0.25, 1.0, 1.0), fill=colour((20, 20, 22)))
        draw.ellipse(rect(0.65, 0.0, 1.0, 0.5), fill=colour((30, 30, 30)))
        draw.rectangle(rect(0.1, 0.45, 0.9, 0.55), fill=colour((245, 245, 245)))
        draw.line([px(0.82, 0.1), px(0.82, 0.4)], fill=(250, 250, 250), width=thick)
    elif species in ("deer mouse", "mouse"):  # native: tan back, white belly, big ears, thin tail
        draw.ellipse(rect(0.25, 0.35, 0.85, 0.9), fill=colour((160, 120, 80)))
        draw.ellipse(rect(0.35, 0.65, 0.8, 0.9), fill=colour((235, 230, 220)))
        for e in (0.7, 0.82):
            draw.ellipse(rect(e, 0.15, e + 0.14, 0.45), fill=colour((215, 160, 160)))
        draw.line([px(0.28, 0.7), px(0.15, 0.6), px(0.05, 0.7)], fill=colour((190, 150, 130)), width=max(1, thick // 2))
    elif species == "rat":  # invasive: the same shape, grey-brown all over, small ears, long thick tail
        draw.ellipse(rect(0.25, 0.35, 0.88, 0.9), fill=colour((95, 85, 78)))
        draw.ellipse(rect(0.76, 0.28, 0.86, 0.42), fill=colour((150, 120, 120)))
        draw.line([px(0.28, 0.75), px(0.12, 0.6), px(0.0, 0.8)], fill=colour((170, 135, 125)), width=thick)
    elif species in ("bird", "scrub jay"):
        plumage = colour((40, 90, 200) if species == "scrub jay" else (70, 110, 190))
        draw.ellipse(rect(0.2, 0.3, 0.8, 0.8), fill=plumage)
        draw.ellipse(rect(0.6, 0.1, 0.9, 0.42), fill=plumage)
        draw.polygon([px(0.88, 0.22), px(1.0, 0.28), px(0.88, 0.33)], fill=(240, 200, 30))
        draw.polygon([px(0.3, 0.45), px(0.65, 0.5), px(0.05, 0.2)], fill=colour((25, 50, 130)))
        draw.line([px(0.45, 0.8), px(0.45, 1.0)], fill=(60, 50, 40), width=2)
    elif species == "lizard":
        scales = colour((70, 150, 60))
        draw.ellipse(rect(0.25, 0.35, 0.8, 0.65), fill=scales)
        draw.ellipse(rect(0.75, 0.38, 1.0, 0.6), fill=scales)
        draw.line([px(0.3, 0.5), px(0.0, 0.45)], fill=scales, width=max(2, int(h * 0.08)))
        for u, v in ((0.35, 0.2), (0.35, 0.8), (0.7, 0.2), (0.7, 0.8)):
            draw.line([px(u, 0.5), px(u + 0.05, v)], fill=scales, width=thick)
        for u in (0.4, 0.55, 0.7):
            draw.ellipse(rect(u - 0.03, 0.45, u + 0.03, 0.52), fill=(230, 200, 60))


def _site_species(site: int) -> list[str]:
    """Every site hosts most species, but not in equal numbers: a realistic, learnable imbalance."""
    srng = np.random.default_rng(2000 + site)
    pool = [s for s in SPECIES if srng.random() < 0.8] or ["fox"]
    return pool


def generate(
    images_uri: str,
    export_uri: str,
    label_spec_uri: str,
    n_images: int = 480,
    n_locations: int = 16,
    seed: int = 0,
    quality: int = 88,
) -> DemoResult:
    """Write the demo images under ``images_uri``, the export to ``export_uri`` and the label spec.

    ``images_uri`` is an ``s3://bucket[/prefix]`` or a folder; the images are stored under Animl's
    ``original/<imageId>-original.jpg`` keys, as in Animl's serving bucket.
    """
    if n_locations > len(SITES) * 4:
        raise ValueError(f"at most {len(SITES) * 4} locations")
    rng = np.random.default_rng(seed)
    cat_id = {name: i for i, name in enumerate(CATEGORIES)}
    images, annotations = [], []
    base_time = dt.datetime(2024, 3, 1, 6, 0, tzinfo=dt.timezone(dt.timedelta(hours=-8)))
    for i in range(n_images):
        site = i % n_locations
        location = f"{SITES[site % len(SITES)]} {site // len(SITES) + 1}"
        serial = f"X{810 + site:03d}A{site * 7 % 10}C"
        size = SIZES[site % len(SIZES)]
        night = rng.random() < 0.2
        img = _background(rng, size, site, night)
        draw = ImageDraw.Draw(img)
        objects = []
        if rng.random() >= 0.1:
            pool = _site_species(site)
            for _ in range(1 + int(rng.random() < 0.2)):
                species = pool[int(rng.integers(len(pool)))]
                scale = rng.uniform(0.18, 0.42) * size[1]
                aspect = {"lizard": 1.9, "skunk": 1.5, "fox": 1.4, "rat": 1.4}.get(species, 1.2)
                w, h = min(scale * aspect, size[0] * 0.8), scale
                x, y = rng.uniform(0, size[0] - w), rng.uniform(size[1] * 0.25, size[1] - h)
                _draw_animal(draw, species, (x, y, w, h), rng, 1 if rng.random() < 0.5 else -1)
                objects.append((species, [int(x), int(y), math.ceil(w), math.ceil(h)]))
        if night:
            img = img.convert("L").convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
        image_id = f"{PROJECT}:{hashlib.md5(data, usedforsecurity=False).hexdigest()}"
        key = f"original/{image_id}-original.jpg"
        storage.put_bytes(_join(images_uri, key), data)
        deployment = location.lower().replace("'", "").replace(" ", "_")
        record = {
            "id": image_id,
            "file_name": f"{PROJECT}/{serial}/{deployment}/{image_id.replace(':', '-')}.jpg",
            "serving_bucket_key": key,
            "original_file_name": f"IMG_{i:04d}.JPG",
            "datetime": (base_time + dt.timedelta(minutes=37 * i)).isoformat(timespec="milliseconds"),
            "location": location,
        }
        if rng.random() >= 0.2:  # some images lack their size, as in real exports
            record["width"], record["height"] = size
        images.append(record)
        if not objects:
            annotations.append(_annotation(image_id, cat_id["empty"], [0, 0, size[0], size[1]], True, rng))
        for species, bbox in objects:
            annotations.append(_annotation(image_id, cat_id[species], bbox, rng.random() >= 0.05, rng))

    export = {
        "info": {
            "version": "1.0",
            "year": 2024,
            "date_created": base_time.isoformat(timespec="milliseconds"),
            "description": f"Image data exported from Animl project '{PROJECT}'. Export ID: demo-{seed}",
        },
        "categories": [{"id": i, "name": n} for i, n in enumerate(CATEGORIES)],
        "images": images,
        "annotations": annotations,
    }
    storage.put_bytes(export_uri, json.dumps(export, indent=1).encode())
    storage.put_bytes(label_spec_uri, json.dumps(LABEL_SPEC, indent=2).encode())
    return DemoResult(
        export_uri=export_uri,
        images_uri=images_uri,
        label_spec_uri=label_spec_uri,
        images=len(images),
        annotations=len(annotations),
        locations=n_locations,
    )


def _annotation(image_id: str, category_id: int, bbox: list[int], validated: bool, rng: np.random.Generator) -> dict:
    return {
        "id": hashlib.md5(f"{image_id}{bbox}{rng.random()}".encode(), usedforsecurity=False).hexdigest()[:24],
        "image_id": image_id,
        "category_id": category_id,
        "sequence_level_annotation": False,
        "bbox": bbox,
        "confidence": None if validated else round(float(rng.uniform(0.5, 0.99)), 3),
        "validated": validated,
        "validated_by": "demo-reviewer" if validated else "Not Reviewed",
    }


def _join(base: str, key: str) -> str:
    return f"{base.rstrip('/')}/{key}"
