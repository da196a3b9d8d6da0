"""The two-phase recipe's parts: a head fitted on cached frozen features, temperature scaling, folding both in."""

import numpy as np
import pytest
import torch

from animl_retrain.modeling import head
from animl_retrain.modeling.backbones import build_model, head_layer
from animl_retrain.modeling.metrics import calibration
from animl_retrain.modeling.metrics import softmax as _softmax
from animl_retrain.vision.preprocessing import Preprocessing


def test_temperature_scaling_calibrates_an_overconfident_model():
    rng = np.random.default_rng(0)
    n, classes = 4000, 5
    y = rng.integers(0, classes, n)
    # right 60% of the time, but always ~99% sure of its answer
    answer = np.where(rng.random(n) < 0.6, y, rng.integers(0, classes, n))
    logits = rng.normal(0, 0.5, (n, classes))
    logits[np.arange(n), answer] += 7.0
    before = calibration(y, _softmax(logits))["ece"]
    t = head.fit_temperature(logits[:2000], y[:2000])  # fitted on "val" ...
    after = calibration(y[2000:], _softmax(logits[2000:] / t))["ece"]  # ... and checked on the rest
    assert before > 0.3 and t > 2 and after < 0.05
    assert (_softmax(logits / t).argmax(1) == logits.argmax(1)).all()  # the ranking is unchanged
    assert head.fit_temperature(np.zeros((0, 3)), np.zeros(0)) == 1.0


def test_a_folded_temperature_divides_the_models_logits():
    model = build_model("mobilenet_v3_small", 4).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
        head.fold_temperature(model, "mobilenet_v3_small", 2.5)
        after = model(x)
    assert torch.allclose(after, before / 2.5, atol=1e-5)


def test_choose_head_picks_l2_on_val_and_folds_the_standardisation_into_the_weights():
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 3, (3, 16))
    y = rng.integers(0, 3, 300)
    x = torch.tensor(centres[y] * 10 + 50 + rng.normal(0, 8, (300, 16)), dtype=torch.float32)  # unscaled features
    fit = head.choose_head(x[:200], y[:200], x[200:], y[200:], ["a", "b", "c"])
    assert fit.l2 in head.L2_GRID and len(fit.grid) == len(head.L2_GRID)
    assert fit.val["val_macro_f1"] == max(g["val_macro_f1"] for g in fit.grid) > 0.9
    # the weights apply to the raw features: the argmax reproduces the val score
    predicted = (x[200:] @ fit.weight.T + fit.bias).argmax(1).numpy()
    assert (predicted == y[200:]).mean() == pytest.approx(fit.val["val_top1"])


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "efficientnet_lite0", "resnet18"])
def test_head_features_are_the_inputs_of_the_final_layer_and_the_head_goes_back(arch):
    model = build_model(arch, 3).eval()
    original = head_layer(model, arch)
    array = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    pre = Preprocessing(image_size=32)
    feats = head.features(model, arch, array, pre, torch.device("cpu"))
    assert head_layer(model, arch) is original
    flipped = head.features(model, arch, array[:, :, ::-1], pre, torch.device("cpu"))
    assert torch.allclose(head.features(model, arch, array, pre, torch.device("cpu"), flip=True), flipped, atol=1e-5)
    from animl_retrain.modeling import transforms

    with torch.no_grad():
        logits = model(transforms.normalise(pre, torch.from_numpy(array).permute(0, 3, 1, 2)))
    assert torch.allclose(original(feats), logits, atol=1e-4)
    head.set_head(model, arch, torch.zeros(3, feats.shape[1]), torch.tensor([0.0, 1.0, 0.0]))
    assert (head_layer(model, arch).bias == torch.tensor([0.0, 1.0, 0.0])).all()
