"""KFP component: the exit handler that records how the run ended (see :mod:`animl_retrain.stages.status`)."""

from animl_retrain.components.container_images import ML_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Output


# The ML image, because tagging runs needs the MLflow client; it is already on the nodes that ran the stages.
@dsl.component(base_image=ML_IMAGE, install_kfp_package=False)
def record_status_op(
    status: dsl.PipelineTaskFinalStatus,
    run_status: Output[Dataset],
    kfp_run_id: str = "",
    experiment: str = "animl-classifier",
):
    """Write the run's final state as an artifact and tag its MLflow runs with it."""
    from animl_retrain.components.runtime import run_stage

    from animl_retrain.stages import status as stage

    run_stage(
        stage.run,
        stage.StatusConfig,
        run_status,
        state=status.state,
        error_code=status.error_code,
        error_message=status.error_message or "",
        pipeline_task=status.pipeline_task_name or "",
        out=run_status.path,
        kfp_run_id=kfp_run_id,
        experiment=experiment,
    )
