"""KFP component: read (or pull from Animl) and validate the export, apply the label spec, decide train or skip."""

from animl_retrain.components.container_images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export_op(
    source: str,
    label_spec: str,
    export: Output[Dataset],
    summary: Output[Markdown],
    unmapped: str = "drop",
    only_validated: bool = True,
    animl_api_url: str = "",
    animl_project: str = "",
    animl_region: str = "us-west-2",
    animl_user_pool_id: str = "",
    animl_client_id: str = "",
    animl_filters: str = "{}",
    animl_timezone: str = "UTC",
    archive: str = "",
    incremental: bool = False,
    model_name: str = "",
) -> str:
    """Validate an Animl COCO export and map its labels; return 'train', or 'skip' when nothing new was validated."""
    import shutil
    from pathlib import Path

    from animl_retrain.components.runtime import run_stage

    from animl_retrain.formats import layout
    from animl_retrain.stages import export as stage

    result = run_stage(
        stage.run,
        stage.ExportConfig,
        export,
        source=source,
        label_spec=label_spec,
        out=export.path,
        unmapped=unmapped,
        only_validated=only_validated,
        animl_api_url=animl_api_url,
        animl_project=animl_project,
        animl_region=animl_region,
        animl_user_pool_id=animl_user_pool_id,
        animl_client_id=animl_client_id,
        animl_filters=animl_filters,
        animl_timezone=animl_timezone,
        archive=archive,
        incremental=incremental,
        model_name=model_name,
    )
    shutil.copyfile(Path(export.path) / layout.SUMMARY_FILE, summary.path)
    return result.decision
