"""MegaDetector inference with ONNX Runtime: letterbox, batched inference, YOLOv5 decoding, NMS, box mapping.

MegaDetector v5a/v5b and the YOLOv5-based MDv1000 models are YOLOv5 networks run at 1280 px. Their ``.pt``
checkpoints unpickle YOLOv5's own (AGPL) classes, so this project never loads them: the user exports the
checkpoint to ONNX once, where the YOLOv5 code lives (see the README), and this module runs the ONNX file.

Everything around the network is our own code, following MegaDetector's "classic" mode:

1. **Letterbox**: scale the image so it fits ``size`` x ``size`` (up or down, OpenCV's INTER_LINEAR as YOLOv5),
   then pad with grey 114 to the next multiple of the stride (a rectangle, not a square, so a 4:3 frame costs
   1280x960, not 1280x1280), or to the model's fixed input shape when the ONNX file has one. JPEGs are decoded
   at the largest DCT reduction that still leaves at least the letterboxed size: 2-3 times faster for frames
   twice the input size or more, at 2-5 grey levels of mean difference in the network input (bench/); the
   stage's ``reduced_decode=False`` decodes in full, exactly as MegaDetector.
2. **Inference** on uint8 NHWC batches: a small graph prepended to the model casts, scales to 0..1 and
   transposes on the device, so a batch crosses to the GPU at a quarter of the float size. Optionally in
   half precision (the model converted to fp16 at load, inputs and outputs kept fp32).
3. **Decoding**: YOLOv5's output rows are ``[cx, cy, w, h, objectness, class scores...]`` in input pixels;
   confidence = objectness x best class score, as MegaDetector computes it.
4. **NMS** per class (torchvision's ``batched_nms``, IoU 0.45, at most 300 boxes), as MegaDetector does.
5. **Mapping back**: minus the padding, divided by the resized size, clipped: ``[x, y, w, h]`` normalised to the
   original image, rounded to 4 decimals; confidences to 3 (MegaDetector's precision).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import log
from animl_retrain.vision.images import DEFAULT_MAX_PIXELS, BadImageError, open_image

PAD_VALUE = 114  # YOLOv5's letterbox grey
STRIDE = 64  # a multiple of every YOLOv5 stride (P5 models: 32, P6 models such as MDv5: 64)
IOU_THRESHOLD = 0.45  # MegaDetector's NMS IoU in its classic mode
MAX_DETECTIONS = 300
MAX_NMS_INPUT = 30_000
COORD_DIGITS = 4
CONF_DIGITS = 3
INPUT_NAME = "images_uint8"


@dataclass(frozen=True)
class Letterbox:
    """Where an image sits in the network input: its original size, resized size and top-left padding."""

    width: int
    height: int
    resized_width: int
    resized_height: int
    left: int
    top: int
    input_width: int
    input_height: int


def letterbox_geometry(
    width: int, height: int, size: int, stride: int = STRIDE, fixed: tuple[int, int] | None = None
) -> Letterbox:
    """YOLOv5's letterbox arithmetic for a ``width`` x ``height`` image.

    Args:
        width: original image width.
        height: original image height.
        size: the long side the image is scaled to (1280 for MegaDetector v5).
        stride: pad a rectangular input to a multiple of this.
        fixed: ``(height, width)`` of a model with a fixed input shape: the image is fitted and padded to it.
    """
    target_h, target_w = fixed if fixed else (size, size)
    ratio = min(target_h / height, target_w / width)
    new_w, new_h = round(width * ratio), round(height * ratio)
    dw, dh = target_w - new_w, target_h - new_h
    if not fixed:
        dw, dh = dw % stride, dh % stride
    left, right = round(dw / 2 - 0.1), round(dw / 2 + 0.1)
    top, bottom = round(dh / 2 - 0.1), round(dh / 2 + 0.1)
    return Letterbox(width, height, new_w, new_h, left, top, new_w + left + right, new_h + top + bottom)


def _draft_factor(width: int, height: int, geom: Letterbox) -> int:
    """The largest JPEG DCT reduction (1, 2, 4, 8) that still decodes at least the resized size."""
    factor = 1
    while (
        factor < 8
        and -(-width // (factor * 2)) >= geom.resized_width
        and -(-height // (factor * 2)) >= (geom.resized_height)
    ):
        factor *= 2
    return factor


def load_letterboxed(
    path: Path,
    size: int,
    stride: int = STRIDE,
    fixed: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduced_decode: bool = True,
) -> tuple[np.ndarray, Letterbox]:
    """Decode an image and letterbox it: a uint8 ``(H, W, 3)`` RGB array and its geometry.

    With ``reduced_decode`` a JPEG at least twice the resized size is decoded at 1/2, 1/4 or 1/8 scale (never
    below the resized size); without it, decoding is full-size, exactly as MegaDetector does.

    Raises:
        BadImageError: the file is not a decodable image (or is over ``max_pixels``).
    """
    geometry: dict[str, Letterbox] = {}

    def scale_for(w: int, h: int) -> int:
        geometry["g"] = letterbox_geometry(w, h, size, stride, fixed)
        return _draft_factor(w, h, geometry["g"]) if reduced_decode else 1

    import cv2

    img, (width, height) = open_image(path, max_pixels=max_pixels, scale_for=scale_for)
    geom = geometry.get("g") or letterbox_geometry(width, height, size, stride, fixed)
    pixels = np.asarray(img)
    if img.size != (geom.resized_width, geom.resized_height):
        cv2.setNumThreads(1)  # one image per worker process: threads would only oversubscribe the cores
        pixels = cv2.resize(pixels, (geom.resized_width, geom.resized_height), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((geom.input_height, geom.input_width, 3), PAD_VALUE, dtype=np.uint8)
    canvas[geom.top : geom.top + geom.resized_height, geom.left : geom.left + geom.resized_width] = pixels
    return canvas, geom


def decode_predictions(
    pred: np.ndarray, conf_threshold: float, iou_threshold: float = IOU_THRESHOLD, max_det: int = MAX_DETECTIONS
) -> np.ndarray:
    """YOLOv5 output rows of one image -> ``(K, 6)`` rows ``[x1, y1, x2, y2, conf, class]`` after per-class NMS.

    ``pred`` is ``(N, 5 + classes)``: ``[cx, cy, w, h, objectness, class scores...]`` in input pixels. A row is
    kept when objectness and objectness x best class score both exceed ``conf_threshold``; NMS runs per class.
    Rows come out by descending confidence.
    """
    import torch
    from torchvision.ops import batched_nms

    pred = np.asarray(pred, dtype=np.float32)
    x = pred[pred[:, 4] > conf_threshold]
    if not len(x):
        return np.zeros((0, 6), dtype=np.float32)
    scores = x[:, 5:] * x[:, 4:5]
    cls = scores.argmax(1)
    conf = scores[np.arange(len(x)), cls]
    keep = conf > conf_threshold
    x, cls, conf = x[keep], cls[keep], conf[keep]
    if not len(x):
        return np.zeros((0, 6), dtype=np.float32)
    order = np.argsort(-conf, kind="stable")[:MAX_NMS_INPUT]
    x, cls, conf = x[order], cls[order], conf[order]
    boxes = np.stack([x[:, 0] - x[:, 2] / 2, x[:, 1] - x[:, 3] / 2, x[:, 0] + x[:, 2] / 2, x[:, 1] + x[:, 3] / 2], 1)
    kept = batched_nms(torch.from_numpy(boxes), torch.from_numpy(conf), torch.from_numpy(cls), iou_threshold)
    kept = kept.numpy()[:max_det]
    return np.concatenate([boxes[kept], conf[kept, None], cls[kept, None].astype(np.float32)], 1)


def to_md_detections(rows: np.ndarray, geom: Letterbox) -> list[dict[str, Any]]:
    """Map decoded rows back to MegaDetector detections: ``bbox`` normalised to the original image.

    Category ids are MegaDetector's: model class 0 -> "1" (animal), 1 -> "2" (person), 2 -> "3" (vehicle).
    """
    out = []
    for x1, y1, x2, y2, conf, cls in rows.tolist():
        nx1 = min(max((x1 - geom.left) / geom.resized_width, 0.0), 1.0)
        ny1 = min(max((y1 - geom.top) / geom.resized_height, 0.0), 1.0)
        nx2 = min(max((x2 - geom.left) / geom.resized_width, 0.0), 1.0)
        ny2 = min(max((y2 - geom.top) / geom.resized_height, 0.0), 1.0)
        if nx2 <= nx1 or ny2 <= ny1:
            continue  # wholly in the padding
        box = [round(v, COORD_DIGITS) for v in (nx1, ny1, nx2 - nx1, ny2 - ny1)]
        out.append({"category": str(int(cls) + 1), "conf": float(round(conf, CONF_DIGITS)), "bbox": box})
    return out


# --- the ONNX model -----------------------------------------------------------------------------------------


def image_input(model):
    """The ONNX model's one image input, checked to be float32 ``[batch, 3, height, width]`` (a YOLOv5 export).

    The one reader of a detector's input: the stage asks it for the letterbox shape before the decoding
    workers start, the loader before it prepends the uint8 input.
    """
    from onnx import TensorProto

    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise PipelineError(f"detector model must have one image input, has {[i.name for i in inputs]}")
    tensor = inputs[0].type.tensor_type
    dims = tensor.shape.dim
    if tensor.elem_type != TensorProto.FLOAT or len(dims) != 4 or dims[1].dim_value not in (0, 3):
        raise PipelineError(
            f"detector input {inputs[0].name!r} must be float32 [batch, 3, height, width] (a YOLOv5 ONNX export)"
        )
    return inputs[0]


def input_shape(model) -> tuple[tuple[int, int] | None, int | None]:
    """The model's fixed ``(height, width)`` and batch size, where its input declares them (None where dynamic)."""
    dims = image_input(model).type.tensor_type.shape.dim
    fixed = (dims[2].dim_value, dims[3].dim_value) if dims[2].dim_value and dims[3].dim_value else None
    return fixed, dims[0].dim_value or None


def read_input_shape(path: Path) -> tuple[tuple[int, int] | None, int | None]:
    """:func:`input_shape` of an ONNX file, read without its weights' external data."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise PipelineError(f"detector weights {path} are not an ONNX model: {e}") from e
    return input_shape(model)


def _with_uint8_input(model):
    """Prepend NHWC uint8 -> NCHW float 0..1 to an ONNX model whose single input is NCHW float."""
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    old = image_input(model)
    dims = old.type.tensor_type.shape.dim

    def dim(d):
        return d.dim_value if d.HasField("dim_value") else (d.dim_param or None)

    new_input = helper.make_tensor_value_info(
        INPUT_NAME, TensorProto.UINT8, [dim(dims[0]), dim(dims[2]), dim(dims[3]), 3]
    )
    scale = helper.make_tensor("_u8_scale", TensorProto.FLOAT, [], [255.0])
    nodes = [
        helper.make_node("Transpose", [INPUT_NAME], ["_u8_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["_u8_nchw"], ["_f32_nchw"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["_f32_nchw", "_u8_scale"], [old.name]),
    ]
    graph.initializer.append(scale)
    graph.input.remove(old)
    graph.input.insert(0, new_input)
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(model)
    return model


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a loaded detector."""

    classes: int | None  # None where the export leaves the output's last dimension symbolic
    fixed_shape: tuple[int, int] | None  # (height, width) when the ONNX input is not dynamic
    fixed_batch: int | None
    provider: str
    precision: str


class Detector:
    """A YOLOv5 detector in ONNX Runtime, fed uint8 NHWC batches of letterboxed images.

    Args:
        model_path: the ONNX file (a YOLOv5 export: input float [B, 3, H, W], output [B, N, 5 + classes]).
        device: "auto" (CUDA when onnxruntime-gpu sees one, else CPU), "cuda" or "cpu".
        precision: "fp32", "fp16" (weights and activations in half precision, I/O in fp32) or "auto" (fp16 on
            CUDA, fp32 on CPU).
        threads: CPU threads for ONNX Runtime (0: its default, one per core).
    """

    def __init__(self, model_path: Path, device: str = "auto", precision: str = "auto", threads: int = 0):
        import onnx
        import onnxruntime as ort

        available = ort.get_available_providers()
        want_cuda = "CUDAExecutionProvider" in available and device != "cpu"
        if device == "cuda" and not want_cuda:
            raise PipelineError(
                f"device 'cuda' asked for, but ONNX Runtime offers only {available}: install onnxruntime-gpu "
                "(the ML image has it) and check that the pod got a GPU"
            )
        try:
            model = onnx.load(str(model_path))
        except Exception as e:
            raise PipelineError(f"detector weights {model_path} are not an ONNX model: {e}") from e
        info = self._inspect(model)
        model = _with_uint8_input(model)
        resolved = precision if precision != "auto" else ("fp16" if want_cuda else "fp32")
        self.session = _session(model, resolved, want_cuda, threads)
        provider = self.session.get_providers()[0]
        if want_cuda and provider != "CUDAExecutionProvider":  # onnxruntime-gpu installed, but no usable GPU
            if device == "cuda":
                raise PipelineError("device 'cuda' asked for, but ONNX Runtime's CUDA provider did not start")
            log.warning("detector: the CUDA provider did not start; running on the CPU")
            if precision == "auto" and resolved == "fp16":
                resolved = "fp32"
                self.session = _session(model, resolved, False, threads)
        self.info = replace(info, provider=provider, precision=resolved)
        self.output_name = self.session.get_outputs()[0].name
        log.info(
            "detector: %s, %s classes, %s, %s, input %s",
            Path(model_path).name,
            info.classes,
            provider,
            resolved,
            "dynamic" if info.fixed_shape is None else "x".join(map(str, info.fixed_shape)),
        )

    @staticmethod
    def _inspect(model) -> ModelInfo:
        fixed, fixed_batch = input_shape(model)
        if not model.graph.output:
            raise PipelineError("detector model has no output")
        out_dims = model.graph.output[0].type.tensor_type.shape.dim
        if len(out_dims) != 3:
            raise PipelineError(
                f"detector model must map [batch, 3, H, W] to [batch, boxes, 5 + classes] (YOLOv5's layout); "
                f"it has output rank {len(out_dims)}"
            )
        _check_output_layout(out_dims[1].dim_value, out_dims[2].dim_value)
        return ModelInfo(
            classes=out_dims[2].dim_value - 5 if out_dims[2].dim_value else None,
            fixed_shape=fixed,
            fixed_batch=fixed_batch,
            provider="",
            precision="",
        )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Raw YOLOv5 output ``(B, N, 5 + classes)`` for a uint8 ``(B, H, W, 3)`` batch."""
        out = self.session.run([self.output_name], {INPUT_NAME: np.ascontiguousarray(batch)})[0]
        if out.ndim != 3:
            raise PipelineError(f"detector output has shape {out.shape}; YOLOv5's is [batch, boxes, 5 + classes]")
        _check_output_layout(out.shape[1], out.shape[2])
        return np.asarray(out, dtype=np.float32)


def _session(model, precision: str, cuda: bool, threads: int):
    """An ONNX Runtime session for ``model`` (converted to fp16 first where asked), on CUDA or the CPU."""
    import onnxruntime as ort

    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    providers: list[Any] = ["CPUExecutionProvider"]
    if cuda:
        providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}))
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def _check_output_layout(middle: int, last: int) -> None:
    """Refuse an output that is not ``[batch, boxes, 5 + classes]``; 0 means unknown (a symbolic dimension)."""
    if not last or 6 <= last <= 105:
        return
    hint = ""
    if middle and middle < 105:
        hint = (
            f" (this looks like the anchor-free [batch, 4 + classes, boxes] layout of YOLOv8/v11-based models, with "
            f"{middle} values per box: not supported)"
        )
    raise PipelineError(
        f"detector output rows have {last} values; YOLOv5's layout is [batch, boxes, 5 + classes] (8 for "
        f"MegaDetector, as YOLOv5's export.py writes it){hint}"
    )


# --- decoding overlapped with inference ------------------------------------------------------------------------


@dataclass
class Decoded:
    """One image from the loader: its index in the file list, the letterboxed pixels, or why it failed."""

    index: int
    pixels: Any  # a uint8 (H, W, 3) torch tensor, or None on failure
    geometry: Letterbox | None
    error: str | None


class _ImageFiles:
    """A torch map-style dataset: file index -> :class:`Decoded` (decoding errors are returned, not raised)."""

    def __init__(self, paths: Sequence[Path], size: int, fixed: tuple[int, int] | None, max_pixels: int, reduced: bool):
        self.paths, self.size, self.fixed, self.max_pixels, self.reduced = list(paths), size, fixed, max_pixels, reduced

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Decoded:
        import torch

        try:
            pixels, geom = load_letterboxed(self.paths[i], self.size, STRIDE, self.fixed, self.max_pixels, self.reduced)
        except (BadImageError, OSError) as e:
            return Decoded(i, None, None, str(e))
        return Decoded(i, torch.from_numpy(pixels), geom, None)


def _as_is(item):
    return item


def decoded_images(
    paths: Sequence[Path],
    size: int,
    fixed: tuple[int, int] | None,
    workers: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduced_decode: bool = True,
) -> Iterator[Decoded]:
    """Decode and letterbox ``paths`` in ``workers`` processes (0: in this thread), in order, a few ahead.

    The worker processes start at once (before the first item is asked for), so they can fork before the
    caller builds its inference session and start decoding while it loads.
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _ImageFiles(paths, size, fixed, max_pixels, reduced_decode),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_is,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    return iter(loader)


def shape_batches(items: Iterable[Decoded], batch_size: int) -> Iterator[list[Decoded]]:
    """Group decoded images into batches of one input shape; a failed image comes out alone, at once.

    Camera-trap projects hold few frame shapes, so batches fill; the remainder of each shape comes out last.
    """
    pending: dict[tuple[int, ...], list[Decoded]] = {}
    for item in items:
        if item.pixels is None:
            yield [item]
            continue
        group = pending.setdefault(tuple(item.pixels.shape), [])
        group.append(item)
        if len(group) == batch_size:
            yield group
            del pending[tuple(item.pixels.shape)]
    yield from pending.values()


def detect_batch(detector: Detector, batch: list[Decoded], min_conf: float) -> list[list[dict[str, Any]]]:
    """Run one same-shape batch; return each image's MegaDetector detections above ``min_conf``."""
    import torch

    pixels = torch.stack([d.pixels for d in batch]).numpy()
    raw = detector(pixels)
    return [
        to_md_detections(decode_predictions(raw[i], min_conf), d.geometry)  # type: ignore[arg-type]
        for i, d in enumerate(batch)
    ]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x, y, w, h]`` boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def compare_detections(
    reference: list[list[dict[str, Any]]], other: list[list[dict[str, Any]]], threshold: float
) -> dict[str, float]:
    """How far ``other`` is from ``reference`` for detections at or above ``threshold``.

    Each reference detection is matched to the best-overlapping ``other`` detection of its category. Returns
    the largest confidence difference, the smallest IoU of a match, and how many reference detections found no
    match (a detection close to the threshold may fall just below it in ``other``; those within 0.05 of the
    threshold are not counted as unmatched).
    """
    max_dconf, min_iou, unmatched, compared = 0.0, 1.0, 0, 0
    for ref_dets, oth_dets in zip(reference, other, strict=True):
        for det in ref_dets:
            if det["conf"] < threshold:
                continue
            same = [o for o in oth_dets if o["category"] == det["category"]]
            best = max(same, key=lambda o: box_iou(det["bbox"], o["bbox"]), default=None)
            if best is None or box_iou(det["bbox"], best["bbox"]) < 0.5:
                unmatched += det["conf"] >= threshold + 0.05
                continue
            compared += 1
            max_dconf = max(max_dconf, abs(det["conf"] - best["conf"]))
            min_iou = min(min_iou, box_iou(det["bbox"], best["bbox"]))
    return {"compared": compared, "max_conf_diff": max_dconf, "min_iou": min_iou, "unmatched": unmatched}


def model_digest(path: Path) -> str:
    """A short SHA-256 of the weights file, to tie results and checkpoints to the model that made them."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
