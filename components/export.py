"""KFP component: read and validate the Animl export, apply the label spec."""

from animl_retrain.components.images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Output


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export_op(
    source: str, label_spec: str, export: Output[Dataset], unmapped: str = "drop", only_validated: bool = True
):
    """Validate an Animl COCO export and map its labels through the label spec."""
    from animl_retrain.components.runtime import run_stage

    from animl_retrain.stages import export as stage

    run_stage(
        stage.run,
        stage.ExportConfig,
        export,
        source=source,
        label_spec=label_spec,
        out=export.path,
        unmapped=unmapped,
        only_validated=only_validated,
    )
