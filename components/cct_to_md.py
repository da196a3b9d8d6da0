"""KFP component: ground-truth boxes as a MegaDetector-format results file."""

from animl_retrain.components.container_images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Input, Output


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def cct_to_md_op(export: Input[Dataset], images: Input[Dataset], ground_truth: Output[Dataset]):
    """Write the export's validated boxes in MegaDetector format."""
    from animl_retrain.components.runtime import run_stage

    from animl_retrain.stages import cct_to_md as stage

    run_stage(
        stage.run,
        stage.CctToMdConfig,
        ground_truth,
        export=export.path,
        images=images.path,
        out=ground_truth.path,
    )
