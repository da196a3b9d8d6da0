"""KFP component: export, check and package the champion, and serve it to Animl from SageMaker."""

from animl_retrain.components.container_images import ML_IMAGE
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Output


@dsl.component(base_image=ML_IMAGE, install_kfp_package=False)
def deploy_op(
    registration: Input[Dataset],
    evaluation: Input[Dataset],
    crops: Input[Dataset],
    deployment: Output[Dataset],
    mlmodel: Output[Artifact],
    summary: Output[Markdown],
    name: str = "animl-classifier",
    version: str = "",
    animl_model_id: str = "",
    stage: str = "dev",
    model_bucket: str = "",
    serving_image: str = "",
    role_arn: str = "",
    max_concurrency: int = 5,
    dry_run: bool = False,
):
    """Deploy this run's model if it is the champion (or ``version`` if named); emit Animl's MLModel record."""
    import shutil
    from pathlib import Path

    from animl_retrain.components.runtime import run_stage

    from animl_retrain.formats import layout
    from animl_retrain.stages import deploy as deploy_stage

    run_stage(
        deploy_stage.run,
        deploy_stage.DeployConfig,
        deployment,
        out=deployment.path,
        parity_images=str(Path(crops.path) / layout.CROPS_DIR),
        registration=registration.path,
        evaluation=evaluation.path,
        name=name,
        version=version,
        animl_model_id=animl_model_id,
        stage=stage,
        model_bucket=model_bucket,
        serving_image=serving_image,
        role_arn=role_arn,
        max_concurrency=max_concurrency,
        dry_run=dry_run,
    )
    record = Path(deployment.path) / layout.MLMODEL_FILE
    Path(mlmodel.path).write_text(record.read_text() if record.is_file() else "{}\n")
    shutil.copyfile(Path(deployment.path) / layout.DEPLOYMENT_SUMMARY_FILE, summary.path)
