import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from animl_retrain.modeling import transforms
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


def test_train_transform_keeps_size_and_normalises(crop):
    pre = Preprocessing(image_size=64)
    out = train_transform(pre)(crop)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert normalise(pre, out[None]) is not None and torch.equal(normalise(pre, out[None]), out[None])


def test_batch_augment_draws_each_item_from_its_own_seed():
    from animl_retrain.modeling.transforms import BatchAugment

    batch = torch.randint(0, 256, (10, 3, 40, 40), dtype=torch.uint8)
    augment = BatchAugment(32)
    whole = augment(batch, list(range(100, 110)))
    alone = augment(batch[[3]], [103])  # the same item, the same seed, other batch-mates (none)
    assert whole.shape == (10, 3, 32, 32) and whole.dtype == torch.uint8
    assert torch.equal(whole[3], alone[0]) and not torch.equal(whole[3], augment(batch[[3]], [104])[0])


def test_batch_augment_without_randomness_is_a_resize_and_step_3():
    from animl_retrain.modeling.transforms import BatchAugment

    pre = Preprocessing(image_size=32)
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    plain = BatchAugment(32, pre.mean, pre.std, scale=(1, 1), ratio=(1, 1), p_rotate=0, p_grey=0)
    plain.jitter = transforms.ColourJitter()  # no jitter
    seeds = [s for s in range(200) if transforms._uniforms([s], 10)[0, 4] >= 0.5][:4]  # draws without a flip
    out = plain(batch, seeds)
    assert torch.allclose(out, normalise(pre, batch), atol=1e-4)
    flipped = [s for s in range(200) if transforms._uniforms([s], 10)[0, 4] < 0.5][:4]
    assert torch.allclose(plain(batch, flipped), normalise(pre, batch.flip(-1)), atol=1e-4)
