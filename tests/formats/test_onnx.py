"""ONNX export (standard ops, exact vs the frozen model) and the savings report's counts."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LAYER_NAMES, make_layer
from torch import nn

import deepshift
from deepshift.models import build_model
from deepshift.report import ENERGY_45NM_PJ, plot_shift_histograms, savings_report

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


def test_report_counts_a_linear_by_hand():
    layer = deepshift.convert_(nn.Linear(8, 4), deepshift.PSConfig(weight_bits=4))
    with torch.no_grad():
        deepshift.shift_parameters(layer)["sign"][0, :3] = 0.0  # three zero weights
    r = savings_report(layer, (3, 8))  # a leading dimension of 3 rows per sample
    (row,) = r.layers
    assert row.macs == r.shift_macs == 3 * 4 * 8
    assert row.weight_shape == [4, 8] and row.type == "Linear" and row.method == "ps"
    assert row.zero_fraction == 3 / 32
    assert row.float32_bytes == 32 * 4 and row.packed_bytes == math.ceil(32 * 4 / 8)
    assert r.other_float_params == 0 and r.float_macs_outside == 0
    assert sum(row.shift_histogram.values()) == 32 - 3


def test_report_counts_a_strided_grouped_padded_conv_by_hand():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    net = nn.Sequential(conv, nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(120, 5))
    deepshift.convert_(net, deepshift.QConfig(), depth=1)  # only the Linear becomes shifts
    deepshift.convert_(net, deepshift.QConfig(weight_bits=5), filter_fn=lambda m, n: n == "0")
    r = savings_report(net, (4, 9, 7))
    # output 6 x 5 x 4 (H: (9 + 2 - 3) // 2 + 1 = 5, W: (7 + 2 - 3) // 2 + 1 = 4), each summing
    # C_in/groups * 3 * 3 = 18 terms
    assert [row.macs for row in r.layers] == [6 * 5 * 4 * 18, 120 * 5]
    assert r.float_mults_outside == 120 and r.float_adds_outside == 120  # BatchNorm at inference
    assert r.other_float_params == 12  # BatchNorm weight and bias (shift-layer biases excluded)
    transposed = deepshift.convert_(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), deepshift.QConfig())
    # each of the 4 x 5 x 5 input elements is scattered into C_out/groups * 9 = 27 outputs
    assert savings_report(transposed, (4, 5, 5)).shift_macs == 4 * 25 * 27
    # a float (unconverted) conv is counted as float work, not as shifts
    r = savings_report(nn.Sequential(nn.Conv2d(2, 3, 3)), (2, 5, 5))
    assert r.shift_macs == 0 and r.float_macs_outside == 3 * 3 * 3 * 18


def test_report_bytes_match_the_packed_file_and_energy_uses_the_table(tmp_path):
    torch.manual_seed(0)
    model = deepshift.convert_(build_model("mnist-conv"), deepshift.PSConfig(weight_bits=5)).eval()
    frozen = deepshift.freeze_(copy.deepcopy(model))  # freeze_ works in place: keep the converted model
    r = savings_report(frozen, (1, 28, 28))
    assert deepshift.shift_layers(model)  # still converted
    assert r.to_dict() == savings_report(model, (1, 28, 28)).to_dict()  # frozen or not, same report
    codes_bytes = sum(m.codes.numel() for m in frozen.modules() if deepshift.is_frozen_layer(m))
    assert r.packed_weight_bytes == codes_bytes
    path = tmp_path / "m.dshift"
    deepshift.save_packed(frozen, path)
    others = sum(t.numel() * t.element_size() for k, t in frozen.state_dict().items()
                 if not k.endswith("codes"))
    assert r.packed_weight_bytes + others <= path.stat().st_size <= r.packed_weight_bytes + others + 4096
    e = ENERGY_45NM_PJ
    assert r.energy_float_pj == pytest.approx(r.shift_macs * (e["fp32_mult"] + e["fp32_add"]))
    assert r.energy_shift_pj == pytest.approx(r.shift_macs * (e["shift"] + e["int32_add"]))
    doubled = savings_report(frozen, (1, 28, 28), {k: 2 * v for k, v in e.items()})
    assert doubled.energy_shift_pj == pytest.approx(2 * r.energy_shift_pj)
    with pytest.raises(ValueError, match="lacks"):
        savings_report(frozen, (1, 28, 28), {"fp32_add": 1.0})


def test_report_json_is_stable_and_the_plot_is_written(tmp_path):
    model = deepshift.convert_(build_model("mnist-fc"), deepshift.PSConfig(weight_bits=3))
    r = savings_report(model, (1, 28, 28))
    data = json.loads(r.to_json())
    assert data["version"] == 1
    assert set(data) == {
        "layers", "shift_macs", "float_macs_outside", "float_mults_outside", "float_adds_outside",
        "other_float_params", "float32_weight_bytes", "packed_weight_bytes", "energy_float_pj",
        "energy_shift_pj", "energy_memory_float_pj", "energy_memory_shift_pj", "input_shape",
        "energy_table", "energy_source", "version",
    }
    assert set(data["layers"][0]) == {
        "name", "type", "weight_shape", "method", "weight_bits", "shift_range", "shifts_used",
        "zero_fraction", "macs", "float32_bytes", "packed_bytes", "shift_histogram",
    }
    assert data["shift_macs"] == 784 * 512 + 512 * 512 + 512 * 10
    png = plot_shift_histograms(r, str(tmp_path / "h.png"))
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "shift-adds" in r.table()
