"""ONNX export: standard ops only, exact against the frozen model."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import LAYER_NAMES, make_layer
from torch import nn

import deepshift
from deepshift.models import build_model

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is an optional extra (deepshift[onnx])")
onnx = pytest.importorskip("onnx", reason="onnx is an optional extra (deepshift[onnx])")


def digits_images(size: int, channels: int, n: int = 200) -> torch.Tensor:
    """Real test images: scikit-learn's digits, resized to the model's input."""
    sk = pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the digits data")
    x = torch.tensor(sk.load_digits().images[-n:], dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.3) / 0.4).repeat(1, channels, 1, 1)


def run_onnx(path, x):
    return torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize("name, size, channels, cfg", [
    ("mnist-fc", 28, 1, deepshift.QConfig(act_bits=(4, 8))),
    ("mnist-conv", 28, 1, deepshift.PSConfig()),
    ("resnet20", 32, 3, deepshift.PSConfig(weight_bits=4)),
])
def test_onnxruntime_matches_the_frozen_model_on_real_images(tmp_path, name, size, channels, cfg):
    torch.manual_seed(0)
    model = build_model(name)
    for m in model.modules():  # trained-looking BatchNorm statistics, not the identity of a fresh one
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    model = deepshift.convert_(model, cfg).eval()
    frozen = deepshift.freeze_(model)
    x = digits_images(size, channels)
    expected = frozen(x)
    path = deepshift.export_onnx(frozen, x[:1], tmp_path / "m.onnx")
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert {n.domain for n in graph.graph.node} <= {""}, "only standard ONNX operators"
    got = run_onnx(path, x)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # Shift layers are exact, and freeze_ puts BatchNorm and pooling in runtime-independent
    # forms (deepshift.frozen_float), so the criterion's 1e-5 holds with room to spare.
    assert (got - expected).abs().max() <= 1e-5


def test_weights_only_mode_is_the_float_simulation(tmp_path):
    torch.manual_seed(0)
    model = deepshift.convert_(build_model("mnist-conv"), deepshift.QConfig()).eval()
    x = digits_images(28, 1, 50)
    path = deepshift.export_onnx(model, x[:1], tmp_path / "w.onnx", mode="weights")
    # A converted model is exported as its frozen copy: power-of-two weights and each bias in the
    # frozen layer's fixed point (DEFAULT_ACT_BITS here), with float activations.
    simulated = copy.deepcopy(model)
    frac = deepshift.DEFAULT_ACT_BITS[1]
    with torch.no_grad():
        for _, layer, _ in deepshift.shift_layers(simulated):
            layer.bias.copy_(torch.round(layer.bias * 2**frac) / 2**frac)
    torch.testing.assert_close(run_onnx(path, x), simulated(x).detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fixed_point, weights"):
        deepshift.export_onnx(model, x[:1], tmp_path / "bad.onnx", mode="int")


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_every_layer_type_exports(tmp_path, name):
    layer, x = make_layer(name)
    deepshift.convert_(layer, deepshift.PSConfig(act_bits=(4, 6)))
    frozen = deepshift.freeze_(layer.eval())
    path = deepshift.export_onnx(frozen, x[:1], tmp_path / "l.onnx")
    torch.testing.assert_close(run_onnx(path, x), frozen(x), rtol=0, atol=1e-5)


def test_the_file_holds_codes_not_float_weights(tmp_path):
    torch.manual_seed(0)
    frozen = deepshift.freeze_(deepshift.convert_(build_model("mnist-fc"), deepshift.QConfig()).eval())
    path = deepshift.export_onnx(frozen, torch.randn(1, 1, 28, 28), tmp_path / "m.onnx")
    packed = deepshift.save_packed(frozen, tmp_path / "m.dshift")
    weights = 784 * 512 + 512 * 512 + 512 * 10
    graph = onnx.load(str(path))
    uint8 = sum(len(t.raw_data) for t in graph.graph.initializer if t.data_type == onnx.TensorProto.UINT8)
    assert uint8 == weights  # one byte per weight
    # a byte per 5-bit code: 1.6x the packed file, against 8 bytes per weight as float64 constants
    assert os.path.getsize(path) < 1.7 * packed < weights * 4
