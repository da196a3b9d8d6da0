"""The label specification: which Animl labels feed each output class of the classifier.

The format follows Microsoft's CameraTraps classification label spec: top-level keys are output labels, each
with ``dataset_labels`` (dataset name -> list of label names). A plain list is accepted as shorthand. Animl
labels are matched by name, case- and space-insensitively, never by category id (ids change between
exports). ``invasive: true`` marks classes that Animl should flag. Keep a native species out of an invasive
class: merging the native deer mouse with the invasive rat into one ``rodent`` class flags every mouse.

```json
{
  "deer_mouse": {"dataset_labels": {"animl": ["deer mouse", "mouse"]}},
  "fox":        {"dataset_labels": {"animl": ["fox", "island fox"]}},
  "rat":        {"dataset_labels": {"animl": ["rat", "black rat"]}, "invasive": true},
  "skunk":      ["skunk", "island spotted skunk"]
}
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from animl_retrain.core import storage
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import decode_json

OTHER = "other"
EMPTY = "empty"
MAX_SPEC_BYTES = 1 << 20


def normalise_name(name: str) -> str:
    """Compare label names without regard to case, surrounding or repeated spaces."""
    return re.sub(r"\s+", " ", name.strip()).casefold()


@dataclass(frozen=True)
class LabelSpec:
    """Output labels and the Animl label names that map to each."""

    classes: dict[str, tuple[str, ...]]
    invasive: frozenset[str] = field(default_factory=frozenset)

    @property
    def labels(self) -> list[str]:
        """Output labels in a stable (sorted) order."""
        return sorted(self.classes)

    def lookup(self) -> dict[str, str]:
        """Map each normalised Animl label name to its output label."""
        out: dict[str, str] = {}
        for label, names in self.classes.items():
            for name in names:
                out[normalise_name(name)] = label
        return out

    def to_json(self) -> dict:
        """The spec in its canonical JSON form."""
        return {
            label: {
                "dataset_labels": {"animl": list(self.classes[label])},
                "invasive": label in self.invasive,
            }
            for label in self.labels
        }


def parse_label_spec(data: object, where: str = "label spec") -> LabelSpec:
    """Validate a decoded label spec and return it; errors name the offending label."""
    if not isinstance(data, dict) or not data:
        raise PipelineError(f"{where}: must be a non-empty JSON object of output label -> Animl labels")
    classes: dict[str, tuple[str, ...]] = {}
    invasive: set[str] = set()
    seen: dict[str, str] = {}
    for label, entry in data.items():
        if not isinstance(label, str) or not label.strip():
            raise PipelineError(f"{where}: output label {label!r} must be a non-empty string")
        if isinstance(entry, list):
            entry = {"dataset_labels": {"animl": entry}}
        if not isinstance(entry, dict) or not isinstance(entry.get("dataset_labels"), dict):
            raise PipelineError(f"{where}: label {label!r} needs a list of names or a 'dataset_labels' object")
        unknown = set(entry) - {"dataset_labels", "invasive", "taxa", "exclude", "max_count", "prioritize"}
        if unknown:
            raise PipelineError(f"{where}: label {label!r} has unknown keys {sorted(unknown)}")
        names: list[str] = []
        for dataset, dataset_names in entry["dataset_labels"].items():
            if not isinstance(dataset_names, list) or not all(isinstance(n, str) for n in dataset_names):
                raise PipelineError(f"{where}: {label!r}.dataset_labels.{dataset} must be a list of strings")
            names.extend(dataset_names)
        if not names:
            raise PipelineError(f"{where}: label {label!r} lists no Animl label names")
        for name in names:
            key = normalise_name(name)
            if key in seen and seen[key] != label:
                raise PipelineError(f"{where}: Animl label {name!r} is mapped to both {seen[key]!r} and {label!r}")
            seen[key] = label
        if not isinstance(entry.get("invasive", False), bool):
            raise PipelineError(f"{where}: {label!r}.invasive must be true or false")
        if entry.get("invasive"):
            invasive.add(label)
        classes[label] = tuple(names)
    return LabelSpec(classes=classes, invasive=frozenset(invasive))


def load_label_spec(source: str) -> LabelSpec:
    """Load a label spec from inline JSON, a local path or an ``s3://`` URI."""
    text = source.strip()
    where = "inline label spec" if text.startswith("{") else f"label spec {source}"
    raw = text if text.startswith("{") else storage.read_bytes(source, max_bytes=MAX_SPEC_BYTES)
    return parse_label_spec(decode_json(raw, where), where)
