"""Animl export -> images -> ground-truth and detector boxes -> crops -> split -> training -> evaluation -> registry.

Read top to bottom: each ``stage(...)`` is one step, fed by the artifacts of the steps before it; ``stage``
(pipelines/k8s.py) gives it its resources, GPUs, secrets, retries and caching on Kubernetes. The exit handler
records the run's final state even when a step fails. Every parameter shows in the Kubeflow UI; secrets (S3 and
MLflow credentials) never do: Kubernetes Secrets put them in the environment.
"""

from pathlib import Path

from animl_retrain.components.cct_to_md import cct_to_md_op
from animl_retrain.components.crop import crop_op
from animl_retrain.components.deploy import deploy_op
from animl_retrain.components.detect import detect_op, detect_skipped_op
from animl_retrain.components.download import download_op
from animl_retrain.components.evaluate import evaluate_op
from animl_retrain.components.export import export_op
from animl_retrain.components.register import register_op
from animl_retrain.components.split import split_op
from animl_retrain.components.status import record_status_op
from animl_retrain.components.status_api import record_status_from_api_op
from animl_retrain.components.train import train_op
from animl_retrain.pipelines import backends
from animl_retrain.pipelines.k8s import stage
from kfp import compiler, dsl

from animl_retrain.config import MODEL_NAME

PIPELINE_NAME = "animl-classifier-retraining"
COMPILED = Path(__file__).with_name("retrain.yaml")


@dsl.pipeline(name=PIPELINE_NAME, description="Retrain Animl's species classifier from human-validated labels.")
def retrain_pipeline(
    export_uri: str,
    images_uri: str,
    label_spec: str,
    model_name: str = MODEL_NAME,
    unmapped_labels: str = "drop",
    only_validated: bool = True,
    detector_weights: str = "",
    detect_images: str = "unboxed",
    detection_threshold: float = 0.2,
    detect_checkpoint: str = "",
    box_source: str = "both",
    image_size: int = 224,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    min_locs: int = 3,
    split_trials: int = 10000,
    frozen_test_uri: str = "",
    new_test_set: bool = False,
    seed: int = 0,
    arch: str = "efficientnet_b0",
    weights: str = "",
    recipe: str = "auto",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 0.001,
    backbone_lr_mult: float = 0.1,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
    optimizer: str = "adamw",
    lr_schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    balance: str = "loss",
    augmentation: str = "camera-trap",
    monitor: str = "val_macro_f1",
    patience: int = 5,
    checkpoint_uri: str = "",
    target_precision: float = 0.95,
    recall_floor: float = 0.0,
    experiment: str = MODEL_NAME,
    train_gpus: str = "1",
    animl_project: str = "",
    animl_api_url: str = "",
    animl_region: str = "us-west-2",
    animl_user_pool_id: str = "",
    animl_client_id: str = "",
    animl_filters: str = "{}",
    animl_timezone: str = "UTC",
    export_archive: str = "",
    incremental: bool = False,
    deploy: bool = False,
    deploy_version: str = "",
    deploy_dry_run: bool = False,
    animl_model_id: str = "",
    animl_stage: str = "dev",
    model_bucket: str = "",
    serving_image: str = "",
    sagemaker_role_arn: str = "",
    max_concurrency: int = 5,
    split_method: str = "optimise",
    split_group_by: str = "auto",
    sequence_gap: float = 60.0,
    cache_uri: str = "",
    cache_max_gb: float = 50.0,
):
    """Animl's classifier retraining pipeline.

    Args:
        export_uri: Animl COCO export, s3://bucket/key.json (or a path on the node), or 'animl-api' to pull a
            fresh export from Animl with the animl_* settings (credentials from the Secret, never parameters).
        images_uri: the bucket holding the full-size images, e.g. s3://animl-images-serving-prod.
        label_spec: label spec as inline JSON or an s3:// URI: output class -> Animl label names.
        model_name: registered model name in MLflow.
        unmapped_labels: 'drop' or 'other': what happens to Animl labels the spec does not list.
        only_validated: keep only annotations a person validated.
        detector_weights: MegaDetector ONNX export (s3:// URI); '' skips detection (ground-truth boxes only).
        detect_images: 'unboxed' (labelled images without a box locating the animal) or 'all'.
        detection_threshold: animal detections at or above this become crops (MDv5: 0.2).
        detect_checkpoint: s3:// prefix for detection checkpoints, so a retried detect task resumes.
        box_source: 'both' (ground truth where it locates the animal, else detector), 'ground_truth' or 'detector'.
        image_size: crop and model input size in pixels.
        val_frac: share of each class for validation.
        test_frac: share of each class for the test set.
        min_locs: drop classes seen at fewer locations.
        split_trials: random location assignments to score (split_method 'random').
        frozen_test_uri: s3:// URI of the frozen test set (the first run writes it, later runs reuse it).
        new_test_set: draw a new test set and overwrite the frozen one.
        seed: random seed for the split and training.
        arch: backbone (torchvision's, or efficientnet_lite0).
        weights: initial weights: '' (random), 'imagenet', or an s3:// URI of a state dict.
        recipe: 'auto' (two-phase with pretrained weights, else end-to-end), 'two-phase' (a head fitted on frozen
            features, then fine-tuning from it, kept only if it beats the head on val) or 'end-to-end'.
        epochs: maximum training epochs (of fine-tuning, in the two-phase recipe).
        batch_size: images per step.
        lr: peak learning rate (of the head, in the two-phase recipe).
        backbone_lr_mult: two-phase recipe: the backbone learns at lr times this.
        weight_decay: weight decay (decoupled, for AdamW).
        label_smoothing: cross-entropy label smoothing.
        optimizer: 'adamw' or 'sgd' (with momentum).
        lr_schedule: 'cosine', 'step' or 'constant'.
        warmup_epochs: linear learning-rate warm-up, in epochs.
        balance: class imbalance treatment: 'loss', 'sampler' or 'none'.
        augmentation: 'camera-trap' or 'none'.
        monitor: early-stopping metric: 'val_macro_f1', 'val_top1' or 'val_loss'.
        patience: early-stopping patience in epochs.
        checkpoint_uri: s3:// prefix for resume checkpoints; the run id is appended, so a retried (preempted)
            train task resumes where it stopped.
        target_precision: precision each invasive class's confidence threshold must reach, chosen on val (and
            then measured on test).
        recall_floor: an invasive threshold may not push the class's val recall below this (0 = no floor).
        experiment: MLflow experiment name.
        train_gpus: GPUs for the training task on the cluster, as a string ('1'; a number parameter would give
            the pod no GPU limit, see pipelines/k8s.py); '0' trains on the CPU (of a GPU node).
        animl_project: Animl project id to export (with export_uri 'animl-api').
        animl_api_url: Animl's GraphQL endpoint, https://<api>.execute-api.<region>.amazonaws.com/<stage>/external.
        animl_region: AWS region of Animl's Cognito user pool.
        animl_user_pool_id: Animl's Cognito user pool id (for SRP login).
        animl_client_id: Animl's Cognito app client id.
        animl_filters: Animl export filters as JSON, e.g. {"cameras": ["X81A2C3D"], "addedStart": "2024-01-01"}.
        animl_timezone: time zone of the dates in the export.
        export_archive: s3://bucket/prefix where every export pulled from Animl is kept under a dated key.
        incremental: skip training when no validated annotation changed since the champion's export.
        deploy: after registration, deploy the champion to SageMaker for Animl (only if this run's model is it).
        deploy_version: deploy this registered version instead, champion or not.
        deploy_dry_run: export, check and package, and report what would change in AWS, changing nothing.
        animl_model_id: the model's _id in Animl (default: model_name).
        animl_stage: Animl deployment stage, as in its SSM parameter names.
        model_bucket: s3://bucket[/prefix] for the model package.
        serving_image: TorchServe CPU image with the torch version that traced the model.
        sagemaker_role_arn: SageMaker execution role.
        max_concurrency: serverless endpoint max concurrency.
        split_method: 'optimise' (construct a split, then improve it by local search) or 'random' (the best of
            split_trials random assignments, the search of Microsoft's and TNC's scripts).
        split_group_by: what the split keeps whole: 'location', 'sequence' (bursts of one camera, by the
            datetime of its images) or 'auto' (by location unless the export has no usable location).
        sequence_gap: seconds: an image this close to the previous one of its camera joins its sequence.
        cache_uri: s3://bucket/prefix of a content-addressed cache of images and crops shared by reruns (a
            scheduled retrain then fetches and crops only what is new); '' (default) turns it off.
        cache_max_gb: size limit of that cache; the oldest entries are removed first.
    """
    # The exit handler runs after every step in the block, whether they succeeded or not (locally too). Backends
    # before 2.14 cannot hand it the block's final status; it asks the KFP API for the run's state there.
    if backends.current().final_status:
        status = stage("status", record_status_op(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, experiment=experiment))
    else:
        status = stage(
            "status", record_status_from_api_op(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, experiment=experiment)
        )
    with dsl.ExitHandler(status, name="retrain"):
        export = stage(
            "export",
            export_op(
                source=export_uri,
                label_spec=label_spec,
                unmapped=unmapped_labels,
                only_validated=only_validated,
                animl_api_url=animl_api_url,
                animl_project=animl_project,
                animl_region=animl_region,
                animl_user_pool_id=animl_user_pool_id,
                animl_client_id=animl_client_id,
                animl_filters=animl_filters,
                animl_timezone=animl_timezone,
                archive=export_archive,
                incremental=incremental,
                model_name=model_name,
            ),
        )
        # Incremental mode: export answers 'skip' (and says why in its summary) when nothing new was validated.
        with dsl.If(export.outputs["Output"] == "train", name="new-validated-labels"):
            images = stage(
                "download",
                download_op(
                    export=export.outputs["export"],
                    images_uri=images_uri,
                    cache_uri=cache_uri,
                    cache_max_gb=cache_max_gb,
                ),
            )
            ground_truth = stage(
                "cct-to-md", cct_to_md_op(export=export.outputs["export"], images=images.outputs["images"])
            )
            detect_args = dict(
                images=images.outputs["images"],
                ground_truth=ground_truth.outputs["ground_truth"],
                weights=detector_weights,
                select=detect_images,
                threshold=detection_threshold,
                checkpoint=detect_checkpoint,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            )
            if backends.current().artifact_one_of:
                # Without weights, detect is not scheduled (no GPU node, no images copied into it): a CPU step
                # writes the empty results file it would have written (pipelines/backends.py: from 2.17).
                with dsl.If(detector_weights != "", name="detector-weights"):
                    detected = stage("detect", detect_op(**detect_args))
                with dsl.Else(name="no-detector-weights"):
                    not_detected = stage("detect-skipped", detect_skipped_op())
                detections = dsl.OneOf(detected.outputs["detections"], not_detected.outputs["detections"])
            else:  # detect runs and, without weights, writes that empty file itself
                detections = stage("detect", detect_op(**detect_args)).outputs["detections"]
            crops = stage(
                "crop",
                crop_op(
                    images=images.outputs["images"],
                    ground_truth=ground_truth.outputs["ground_truth"],
                    detections=detections,
                    crop_size=image_size,
                    box_source=box_source,
                    cache_uri=cache_uri,
                    cache_max_gb=cache_max_gb,
                ),
            )
            split = stage(
                "split",
                split_op(
                    crops=crops.outputs["crops"],
                    val_frac=val_frac,
                    test_frac=test_frac,
                    min_locs=min_locs,
                    trials=split_trials,
                    seed=seed,
                    frozen_test_uri=frozen_test_uri,
                    new_test_set=new_test_set,
                    method=split_method,
                    group_by=split_group_by,
                    sequence_gap=sequence_gap,
                ),
            )
            model = stage(
                "train",
                train_op(
                    crops=crops.outputs["crops"],
                    split=split.outputs["split"],
                    arch=arch,
                    weights=weights,
                    image_size=image_size,
                    recipe=recipe,
                    epochs=epochs,
                    batch_size=batch_size,
                    lr=lr,
                    backbone_lr_mult=backbone_lr_mult,
                    weight_decay=weight_decay,
                    label_smoothing=label_smoothing,
                    optimizer=optimizer,
                    lr_schedule=lr_schedule,
                    warmup_epochs=warmup_epochs,
                    balance=balance,
                    augmentation=augmentation,
                    monitor=monitor,
                    patience=patience,
                    seed=seed,
                    checkpoint_uri=checkpoint_uri,
                    experiment=experiment,
                    kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    gpus=train_gpus,
                ),
                gpus=train_gpus,
            )
            evaluation = stage(
                "evaluate",
                evaluate_op(
                    model=model.outputs["model"],
                    crops=crops.outputs["crops"],
                    split=split.outputs["split"],
                    export=export.outputs["export"],
                    registered_name=model_name,
                    target_precision=target_precision,
                    recall_floor=recall_floor,
                ),
            )
            registration = stage(
                "register",
                register_op(
                    model=model.outputs["model"],
                    evaluation=evaluation.outputs["evaluation"],
                    export=export.outputs["export"],
                    name=model_name,
                    kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                ),
            )
            # Deployment is opt-in; the stage itself deploys only the champion (or the version named).
            with dsl.If(deploy == True, name="deploy-enabled"):  # noqa: E712 (a KFP condition, not Python)
                stage(
                    "deploy",
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
                    ),
                )


def compile_pipeline(path: Path = COMPILED, kfp_backend: str = backends.DEFAULT) -> Path:
    """Compile the pipeline to KFP IR YAML at ``path``, in the variant the backend ``kfp_backend`` accepts."""
    target = backends.backend(kfp_backend)
    with backends.targeting(target):  # the pipeline function is traced again, for this backend
        pipeline = dsl.pipeline(name=retrain_pipeline.name, description=retrain_pipeline.description)
        compiler.Compiler().compile(pipeline(retrain_pipeline.pipeline_func), package_path=str(path))
    if not (target.optional_env and target.security_context):
        import yaml

        spec, platform = yaml.safe_load_all(path.read_text())
        path.write_text(yaml.safe_dump_all([spec, backends.strip_unsupported(platform, target)], sort_keys=False))
    return path
