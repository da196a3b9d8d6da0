"""KFP components: MegaDetector on labelled images without a box locating the animal (GPU task), and its stand-in.

The stand-in runs instead of detect where the backend can skip detect without weights (a CPU task, no images).
"""

from animl_retrain.components.container_images import CPU_IMAGE, ML_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Input, Output


@dsl.component(base_image=ML_IMAGE, install_kfp_package=False)
def detect_op(
    images: Input[Dataset],
    ground_truth: Input[Dataset],
    detections: Output[Dataset],
    weights: str = "",
    select: str = "unboxed",
    threshold: float = 0.2,
    image_size: int = 1280,
    batch_size: int = 8,
    checkpoint: str = "",
    run_id: str = "",
):
    """Write MegaDetector results (format 1.6) for the selected images; resumes from ``checkpoint``."""
    from animl_retrain.components.runtime import run_stage

    from animl_retrain.stages import detect as stage

    run_stage(
        stage.run,
        stage.DetectConfig,
        detections,
        images=images.path,
        ground_truth=ground_truth.path,
        out=detections.path,
        weights=weights,
        select=select,
        threshold=threshold,
        image_size=image_size,
        batch_size=batch_size,
        checkpoint=checkpoint,
        run_id=run_id,
    )


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def detect_skipped_op(detections: Output[Dataset]):
    """Write the empty results file detect writes without weights (the crop stage then uses ground-truth boxes)."""
    from animl_retrain.components.runtime import run_stage

    from animl_retrain.stages import detect as stage

    run_stage(stage.skipped, stage.SkippedConfig, detections, out=detections.path)
