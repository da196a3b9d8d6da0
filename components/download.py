"""KFP component: fetch the full-size images the export needs."""

from animl_retrain.components.container_images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Input, Output


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def download_op(
    export: Input[Dataset],
    images_uri: str,
    images: Output[Dataset],
    workers: int = 16,
    max_missing_fraction: float = 0.05,
    cache_uri: str = "",
    cache_max_gb: float = 50.0,
):
    """Download every image with kept objects; missing and undecodable ones are reported."""
    from animl_retrain.components.runtime import run_stage

    from animl_retrain.stages import download as stage

    run_stage(
        stage.run,
        stage.DownloadConfig,
        images,
        export=export.path,
        images_uri=images_uri,
        out=images.path,
        workers=workers,
        max_missing_fraction=max_missing_fraction,
        cache_uri=cache_uri,
        cache_max_gb=cache_max_gb,
    )
