"""KFP component: register the model in MLflow and move the champion alias when it wins."""

from animl_retrain.components.container_images import ML_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output


@dsl.component(base_image=ML_IMAGE, install_kfp_package=False)
def register_op(
    model: Input[Model],
    evaluation: Input[Dataset],
    export: Input[Dataset],
    registration: Output[Dataset],
    summary: Output[Markdown],
    name: str = "animl-classifier",
    kfp_run_id: str = "",
):
    """Register the model version; alias it challenger, and champion if it beats the current one."""
    import shutil
    from pathlib import Path

    from animl_retrain.components.runtime import run_stage

    from animl_retrain.formats import layout
    from animl_retrain.stages import register as stage

    run_stage(
        stage.run,
        stage.RegisterConfig,
        registration,
        model=model.path,
        evaluation=evaluation.path,
        export=export.path,
        out=registration.path,
        name=name,
        kfp_run_id=kfp_run_id,
    )
    shutil.copyfile(Path(registration.path) / layout.REGISTRATION_SUMMARY_FILE, summary.path)
