"""KFP component: square crops around every box, resized once to the training size."""

from animl_retrain.components.container_images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Input, Output


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def crop_op(
    images: Input[Dataset],
    ground_truth: Input[Dataset],
    detections: Input[Dataset],
    crops: Output[Dataset],
    crop_size: int = 224,
    box_source: str = "both",
    cache_uri: str = "",
    cache_max_gb: float = 50.0,
):
    """Cut and store the crops (ground-truth and/or detector boxes), with a manifest."""
    from animl_retrain.components.runtime import run_stage

    from animl_retrain.stages import crop as stage

    run_stage(
        stage.run,
        stage.CropConfig,
        crops,
        images=images.path,
        ground_truth=ground_truth.path,
        detections=detections.path,
        out=crops.path,
        crop_size=crop_size,
        box_source=box_source,
        cache_uri=cache_uri,
        cache_max_gb=cache_max_gb,
    )
