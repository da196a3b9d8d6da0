"""KFP component: MegaDetector on the images that have labels but no box locating the animal (GPU task)."""

from animl_retrain.components.container_images import ML_IMAGE
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
