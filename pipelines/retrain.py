"""Animl export -> images -> ground-truth boxes -> crops -> location split -> training -> evaluation -> registry.

Read top to bottom: each line is one stage, fed by the artifacts of the stages before it. Every parameter
shows in the Kubeflow UI; secrets (S3 and MLflow credentials) never do: the components read them from the
environment.
"""

from pathlib import Path

from animl_retrain.components.cct_to_md import cct_to_md_op
from animl_retrain.components.crop import crop_op
from animl_retrain.components.deploy import deploy_op
from animl_retrain.components.download import download_op
from animl_retrain.components.evaluate import evaluate_op
from animl_retrain.components.export import export_op
from animl_retrain.components.register import register_op
from animl_retrain.components.split import split_op
from animl_retrain.components.train import train_op
from kfp import compiler, dsl

PIPELINE_NAME = "animl-classifier-retraining"
COMPILED = Path(__file__).with_name("retrain.yaml")


@dsl.pipeline(name=PIPELINE_NAME, description="Retrain Animl's species classifier from human-validated labels.")
def retrain_pipeline(
    export_uri: str,
    images_uri: str,
    label_spec: str,
    model_name: str = "animl-classifier",
    unmapped_labels: str = "drop",
    only_validated: bool = True,
    image_size: int = 224,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    min_locs: int = 3,
    split_trials: int = 10000,
    seed: int = 0,
    arch: str = "efficientnet_b0",
    weights: str = "",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 0.001,
    balance: str = "loss",
    patience: int = 5,
    experiment: str = "animl-classifier",
    deploy: bool = False,
    deploy_version: str = "",
    deploy_dry_run: bool = False,
    animl_model_id: str = "",
    animl_stage: str = "dev",
    model_bucket: str = "",
    serving_image: str = "",
    sagemaker_role_arn: str = "",
    max_concurrency: int = 5,
):
    """Animl's classifier retraining pipeline.

    Args:
        export_uri: Animl COCO export, s3://bucket/key.json (or a path on the node).
        images_uri: the bucket holding the full-size images, e.g. s3://animl-images-serving-prod.
        label_spec: label spec as inline JSON or an s3:// URI: output class -> Animl label names.
        model_name: registered model name in MLflow.
        unmapped_labels: 'drop' or 'other': what happens to Animl labels the spec does not list.
        only_validated: keep only annotations a person validated.
        image_size: crop and model input size in pixels.
        val_frac: share of each class for validation.
        test_frac: share of each class for the test set.
        min_locs: drop classes seen at fewer locations.
        split_trials: random location assignments to score.
        seed: random seed for the split and training.
        arch: torchvision backbone.
        weights: initial weights: '' (random), 'imagenet', or an s3:// URI of a state dict.
        epochs: maximum training epochs.
        batch_size: images per step.
        lr: peak learning rate.
        balance: class imbalance treatment: 'loss', 'sampler' or 'none'.
        patience: early-stopping patience in epochs.
        experiment: MLflow experiment name.
        deploy: after registration, deploy the champion to SageMaker for Animl (only if this run's model is it).
        deploy_version: deploy this registered version instead, champion or not.
        deploy_dry_run: export, check and package, and report what would change in AWS, changing nothing.
        animl_model_id: the model's _id in Animl (default: model_name).
        animl_stage: Animl deployment stage, as in its SSM parameter names.
        model_bucket: s3://bucket[/prefix] for the model package.
        serving_image: TorchServe CPU image with the torch version that traced the model.
        sagemaker_role_arn: SageMaker execution role.
        max_concurrency: serverless endpoint max concurrency.
    """
    export = export_op(
        source=export_uri, label_spec=label_spec, unmapped=unmapped_labels, only_validated=only_validated
    ).set_display_name("export")
    images = download_op(export=export.outputs["export"], images_uri=images_uri).set_display_name("download")
    ground_truth = cct_to_md_op(export=export.outputs["export"], images=images.outputs["images"]).set_display_name(
        "cct-to-md"
    )
    crops = crop_op(
        images=images.outputs["images"],
        ground_truth=ground_truth.outputs["ground_truth"],
        crop_size=image_size,
    ).set_display_name("crop")
    split = split_op(
        crops=crops.outputs["crops"],
        val_frac=val_frac,
        test_frac=test_frac,
        min_locs=min_locs,
        trials=split_trials,
        seed=seed,
    ).set_display_name("split")
    model = train_op(
        crops=crops.outputs["crops"],
        split=split.outputs["split"],
        arch=arch,
        weights=weights,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        balance=balance,
        patience=patience,
        seed=seed,
        experiment=experiment,
        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_display_name("train")
    evaluation = evaluate_op(
        model=model.outputs["model"],
        crops=crops.outputs["crops"],
        split=split.outputs["split"],
        registered_name=model_name,
    ).set_display_name("evaluate")
    registration = register_op(
        model=model.outputs["model"],
        evaluation=evaluation.outputs["evaluation"],
        export=export.outputs["export"],
        name=model_name,
        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_display_name("register")
    with dsl.If(deploy == True, name="deploy-enabled"):  # noqa: E712 (a KFP condition, not a Python comparison)
        deploy_op(
            registration=registration.outputs["registration"],
            evaluation=evaluation.outputs["evaluation"],
            crops=crops.outputs["crops"],
            name=model_name,
            version=deploy_version,
            animl_model_id=animl_model_id,
            stage=animl_stage,
            model_bucket=model_bucket,
            serving_image=serving_image,
            role_arn=sagemaker_role_arn,
            max_concurrency=max_concurrency,
            dry_run=deploy_dry_run,
        ).set_display_name("deploy").set_caching_options(False)


def compile_pipeline(path: Path = COMPILED) -> Path:
    """Compile the pipeline to KFP IR YAML at ``path``."""
    compiler.Compiler().compile(retrain_pipeline, package_path=str(path))
    return path
