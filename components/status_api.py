"""KFP component: the exit handler for backends up to 2.5, which cannot pass it the final status.

It asks the KFP API how the run's tasks ended instead (see :mod:`animl_retrain.stages.status` and
``pipelines/backends.py``).
"""

from animl_retrain.components.container_images import ML_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Output


@dsl.component(base_image=ML_IMAGE, install_kfp_package=False)
def record_status_from_api_op(run_status: Output[Dataset], kfp_run_id: str = "", experiment: str = "animl-classifier"):
    """Ask the KFP API how the run's tasks ended, write it as an artifact and tag the MLflow runs with it."""
    from animl_retrain.components.runtime import run_stage

    from animl_retrain.stages import status as stage

    run_stage(
        stage.run, stage.StatusConfig, run_status, out=run_status.path, kfp_run_id=kfp_run_id, experiment=experiment
    )
