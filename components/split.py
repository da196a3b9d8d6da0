"""KFP component: location- (or sequence-) grouped train/val/test split, the label index and a summary."""

from animl_retrain.components.container_images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def split_op(
    crops: Input[Dataset],
    split: Output[Dataset],
    summary: Output[Markdown],
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    min_locs: int = 3,
    trials: int = 10000,
    seed: int = 0,
    frozen_test_uri: str = "",
    new_test_set: bool = False,
    method: str = "optimise",
    group_by: str = "auto",
    sequence_gap: float = 60.0,
):
    """Assign every location (or sequence) wholly to train, val or test."""
    import shutil
    from pathlib import Path

    from animl_retrain.components.runtime import run_stage

    from animl_retrain.formats import layout
    from animl_retrain.stages import split as stage

    run_stage(
        stage.run,
        stage.SplitConfig,
        split,
        crops=crops.path,
        out=split.path,
        val_frac=val_frac,
        test_frac=test_frac,
        min_locs=min_locs,
        trials=trials,
        seed=seed,
        frozen_test_uri=frozen_test_uri,
        new_test_set=new_test_set,
        method=method,
        group_by=group_by,
        sequence_gap=sequence_gap,
    )
    shutil.copyfile(Path(split.path) / layout.SUMMARY_FILE, summary.path)
