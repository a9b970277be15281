"""The savings report: operations, bytes and energy counted by hand, frozen and converted alike."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import deepshift
from deepshift.models import build_model
from deepshift.report import ENERGY_45NM_PJ, plot_shift_histograms, savings_report


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
    assert data["version"] == 2
    assert set(data) == {
        "layers", "shift_macs", "float_macs_outside", "float_mults_outside", "float_adds_outside",
        "attention_mults",
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
