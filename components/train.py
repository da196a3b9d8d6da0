"""KFP component: train the classifier, logging to MLflow."""

from animl_retrain.components.container_images import ML_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output


@dsl.component(base_image=ML_IMAGE, install_kfp_package=False)
def train_op(
    crops: Input[Dataset],
    split: Input[Dataset],
    model: Output[Model],
    arch: str = "efficientnet_b0",
    weights: str = "",
    image_size: int = 224,
    recipe: str = "auto",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
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
    seed: int = 0,
    checkpoint_uri: str = "",
    experiment: str = "animl-classifier",
    kfp_run_id: str = "",
    gpus: str = "1",
):
    """Train the classifier (head on frozen features, then fine-tuning, for pretrained weights); resumes if retried.

    ``gpus`` is the GPU count the pipeline requests for this task (pipelines/k8s.py), a string because the
    backend reads the GPU limit only from a string parameter: '0' trains on the CPU, any
    other count lets the stage pick the GPU when there is one. It is an input here, not only a resource setting,
    also because kfp 2.17 passes a parameter into the exit handler's sub-DAG only when a task there consumes it.
    """
    from animl_retrain.components.runtime import run_stage

    from animl_retrain.core.checks import gpu_count
    from animl_retrain.stages import train as stage

    run_stage(
        stage.run,
        stage.TrainConfig,
        model,
        crops=crops.path,
        split=split.path,
        out=model.path,
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
        kfp_run_id=kfp_run_id,
        device="cpu" if gpu_count(gpus) == 0 else "auto",
    )
