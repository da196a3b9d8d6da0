import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from animl_retrain.modeling.transforms import ColourJitter, normalise, train_transform
from animl_retrain.vision.preprocessing import Preprocessing


@pytest.fixture
def crop():
    rng = np.random.default_rng(0)
    smooth = rng.integers(30, 220, (3, 8, 8)).astype(np.float32)
    big = torch.nn.functional.interpolate(torch.from_numpy(smooth)[None], size=(64, 64), mode="bilinear")[0]
    return big.round().to(torch.uint8)


def test_jitter_without_ranges_is_the_identity(crop):
    out = ColourJitter()(crop)
    assert out.dtype == torch.uint8 and torch.equal(out, crop)


@pytest.mark.parametrize(
    ("factors", "reference"),
    [
        ({"brightness": 1.25}, lambda x: F.adjust_brightness(x, 1.25)),
        ({"contrast": 0.75}, lambda x: F.adjust_contrast(x, 0.75)),
        ({"saturation": 1.2}, lambda x: F.adjust_saturation(x, 1.2)),
    ],
)
def test_single_factors_match_torchvision(crop, factors, reference):
    diff = (ColourJitter().apply(crop, **factors).int() - reference(crop).int()).abs()
    assert diff.max() <= 1


def test_hue_turns_the_same_way_as_torchvision_and_keeps_grey_grey(crop):
    red = torch.zeros(3, 4, 4, dtype=torch.uint8)
    red[0] = 200
    red[1] = 40
    ours, theirs = ColourJitter().apply(red, hue=0.05), F.adjust_hue(red, 0.05)
    assert int(ours[1, 0, 0]) > 40 and int(theirs[1, 0, 0]) > 40  # red turns towards yellow in both
    grey = torch.full((3, 4, 4), 90, dtype=torch.uint8)
    assert torch.equal(ColourJitter().apply(grey, saturation=0.8, hue=0.1), grey)


def test_random_jitter_stays_in_range_and_varies(crop):
    torch.manual_seed(0)
    jitter = ColourJitter(brightness=0.3, contrast=0.3, saturation=0.2, hue=0.02)
    outs = [jitter(crop) for _ in range(5)]
    assert all(o.shape == crop.shape and o.dtype == torch.uint8 for o in outs)
    assert len({o.sum().item() for o in outs}) == 5
    with pytest.raises(ValueError):
        ColourJitter(hue=0.7)


def test_normalise_is_imagenet_normalisation():
    batch = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    pre = Preprocessing()
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    assert torch.allclose(normalise(pre, batch), (batch.float() / 255 - mean) / std, atol=1e-5)


def test_train_transform_keeps_size_and_dtype(crop):
    out = train_transform(Preprocessing(image_size=64))(crop)
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
