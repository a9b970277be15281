"""Integer-only frozen models (deepshift.integer_only): integers from the input to the logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import deepshift
from deepshift.frozen import integer as integer_module
from deepshift.frozen.integer import integer_only, power_terms, set_reference_, terms_value
from deepshift.models import build_model
from deepshift.ops.reference import round_shift


def _frozen(name: str, cfg, shape, in_channels=None, seed=0):
    torch.manual_seed(seed)
    net = build_model(name, in_channels=in_channels)
    x = torch.randn(*shape)
    net.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(3):
            net(x + 0.5 * torch.randn_like(x))
    deepshift.convert_(net.eval(), cfg)
    return deepshift.freeze_(net), x


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=32), st.integers(-12, 24))
def test_round_shift_rounds_to_nearest_ties_to_even(values, amount):
    x = torch.tensor(values, dtype=torch.int64)
    expected = torch.round(x.double() * 2.0**-amount).to(torch.int64)  # exact in float64 here
    assert torch.equal(round_shift(x, amount), expected)
    # the per-element (tensor) form agrees
    amounts = torch.full_like(x, amount)
    assert torch.equal(round_shift(x, amounts), expected)


def test_round_shift_ties_and_mixed_amounts():
    x = torch.tensor([3, 5, -3, -5, -1, 1, 7, -7, 6])
    assert round_shift(x, 1).tolist() == [2, 2, -2, -2, 0, 0, 4, -4, 3]  # 1.5, 2.5, ... to even
    amounts = torch.tensor([1, 1, 0, -2, 2, 3, -1, 2, 1])
    expected = torch.round(x.double() * torch.exp2(-amounts.double())).to(torch.int64)
    assert torch.equal(round_shift(x, amounts), expected)


def test_requantize_saturates_and_rounds():
    step = integer_module.Requantize(in_frac=10, out_frac=8, lo=-128, hi=127)
    x = torch.tensor([2**20, -(2**20), 6, 2, -6, 511, -514])  # /4: huge, huge, 1.5, 0.5, -1.5, 127.75, -128.5
    assert step(x).tolist() == [127, -128, 2, 0, -2, 127, -128]


def test_power_terms_approximate_better_with_each_term_and_are_exact_for_powers_of_two():
    torch.manual_seed(0)
    values = torch.randn(500, dtype=torch.float64) * 3
    errors = []
    for k in (1, 2, 3, 4):
        signs, exps = power_terms(values, k)
        assert signs.shape == exps.shape == (k, 500) and signs.dtype == exps.dtype == torch.int64
        assert set(signs.unique().tolist()) <= {-1, 0, 1}
        errors.append(float(((terms_value(signs, exps) - values) / values).abs().max()))
    assert all(e <= 3.0 ** -(k + 1) + 1e-12 for k, e in enumerate(errors))  # greedy: within s / 3**k
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    exact = torch.tensor([0.25, -8.0, 1.0, 0.0], dtype=torch.float64)
    signs, exps = power_terms(exact, 2)
    assert torch.equal(terms_value(signs, exps), exact) and signs[1].abs().sum() == 0


class _DispatchLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), [t.dtype for t in flat if isinstance(t, torch.Tensor)]))
        return out


@pytest.mark.parametrize("name,shape,in_channels", [("mnist-conv", (2, 1, 28, 28), None),
                                                    ("resnet20", (2, 1, 28, 28), 1),
                                                    ("resnet20", (2, 3, 32, 32), None)])
def test_no_op_between_the_input_quantisation_and_the_logits_makes_a_float_tensor(name, shape, in_channels):
    frozen, x = _frozen(name, deepshift.QConfig(weight_bits=5), shape, in_channels)
    model = integer_only(frozen, x)
    with _DispatchLog() as log, torch.no_grad():
        y = model(x)
    ops = log.ops
    start = next(i for i, (op, _) in enumerate(ops) if "quantize_input" in op)
    assert all(not dt.is_floating_point for dt in ops[start][1])
    # the logits: int32 / int64 -> float64, times 2**-frac, -> float32: the only float ops after the input's
    first_float = next(i for i in range(start + 1, len(ops)) if any(dt.is_floating_point for dt in ops[i][1]))
    assert len(ops) - first_float <= 3, ops[first_float:]
    between = ops[start + 1:first_float]
    layers = sum(1 for m in frozen.modules() if deepshift.is_frozen_layer(m))
    # all ran: convolutions as one op with their requantisation and BatchNorm (int_conv)
    shift_ops = ("shift_conv", "shift_linear", "int_conv")
    assert sum(1 for op, _ in between if any(k in op for k in shift_ops)) == layers
    assert all(not dt.is_floating_point for _, dts in between for dt in dts), \
        [op for op, dts in between if any(dt.is_floating_point for dt in dts)]
    assert y.dtype == torch.float32 and y.shape == (shape[0], 10)


def test_without_batchnorm_integer_only_equals_the_frozen_model_bit_for_bit():
    # mnist-conv has no BatchNorm: every step between the shift layers is exact in float64 too
    for cfg in (deepshift.QConfig(weight_bits=5), deepshift.PSConfig(weight_bits=3),
                deepshift.QConfig(weight_bits=4, act_bits=(6, 6))):
        frozen, x = _frozen("mnist-conv", cfg, (8, 1, 28, 28))
        x = x.double()
        model = integer_only(frozen, x)
        with torch.no_grad():
            assert torch.equal(model(x), frozen(x))


@pytest.mark.parametrize("shape,in_channels", [((4, 1, 28, 28), 1), ((4, 3, 32, 32), None)],
                         ids=["28x28-pool49", "32x32-pool64"])
def test_with_exact_scales_a_resnet_follows_the_frozen_model(shape, in_channels):
    frozen, x = _frozen("resnet20", deepshift.QConfig(weight_bits=5), shape, in_channels)
    with torch.no_grad():
        expected = frozen(x)
        close = integer_only(frozen, x, scale_terms=8)(x)
        rough = integer_only(frozen, x, scale_terms=1)(x)
    err_close = float((close - expected).abs().max())
    err_rough = float((rough - expected).abs().max())
    assert err_close < 0.01 * float(expected.abs().max()), err_close
    assert err_close < err_rough


@pytest.mark.parametrize("cfg", [deepshift.QConfig(weight_bits=5), deepshift.PSConfig(weight_bits=3),
                                 deepshift.QConfig(weight_bits=2, act_bits=(4, 4))],
                         ids=["q5", "ps3", "q2-a4.4"])
def test_the_integer_reference_equals_the_native_path_bit_for_bit(cfg):
    for name, shape, channels in (("resnet20", (3, 1, 28, 28), 1), ("mnist-conv", (3, 1, 28, 28), None)):
        frozen, x = _frozen(name, cfg, shape, channels)
        model = integer_only(frozen, x)
        with torch.no_grad():
            native = model(x)
            reference = set_reference_(copy.deepcopy(model))(x)
        assert torch.equal(native, reference)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-(2**30), 2**30), min_size=1, max_size=16), st.integers(-6, 12),
       st.one_of(st.none(), st.integers(-(2**20), 2**20)), st.one_of(st.none(), st.integers(-(2**20), 2**20)),
       st.integers(-(2**15), 0), st.integers(0, 2**15))
def test_a_clamp_before_a_requantisation_merges_into_its_range(values, shift, clamp_lo, clamp_hi, lo, hi):
    # what _fuse_clamps relies on: the rounding shift is monotone
    x = torch.tensor(values, dtype=torch.int64)
    if clamp_lo is not None and clamp_hi is not None and clamp_lo > clamp_hi:
        clamp_lo, clamp_hi = clamp_hi, clamp_lo
    amount = torch.tensor(shift)
    clamped = x if clamp_lo is None and clamp_hi is None else torch.clamp(x, clamp_lo, clamp_hi)
    expected = torch.clamp(round_shift(clamped, amount), lo, hi)
    new_lo = lo if clamp_lo is None else max(lo, int(round_shift(torch.tensor(clamp_lo), amount)))
    new_hi = hi if clamp_hi is None else min(hi, int(round_shift(torch.tensor(clamp_hi), amount)))
    if new_lo <= new_hi:  # (else _fuse_clamps leaves the clamp alone)
        assert torch.equal(torch.clamp(round_shift(x, amount), new_lo, new_hi), expected)


def test_relus_after_convs_without_batchnorm_and_before_linear_layers_leave_no_pass_of_their_own():
    frozen, x = _frozen("mnist-conv", deepshift.QConfig(weight_bits=5), (4, 1, 28, 28))
    model = integer_only(frozen, x)
    kinds = [type(m).__name__ for m in model.children()]
    assert "Clamp" not in kinds, kinds  # into the convs' epilogues and the Linear's requantisation
    assert kinds.count("IntegerConv") == 2
    with torch.no_grad():
        assert torch.equal(model(x.double()), frozen(x.double()))
        assert torch.equal(model(x), set_reference_(copy.deepcopy(model))(x))


class _ReluThenAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(2 * 5 * 5, 3)

    def forward(self, x):
        y = torch.relu(self.c1(x)) + x  # a residual after the ReLU of a conv without BatchNorm
        y = torch.relu(F.relu6(self.c2(y)))  # two clamps in a row
        return self.fc(y.flatten(1))


def test_clamp_fusions_keep_a_relu_before_a_residual_add_and_merge_clamps_in_a_row(monkeypatch):
    torch.manual_seed(0)
    frozen = deepshift.freeze_(deepshift.convert_(_ReluThenAdd().eval(), deepshift.QConfig(weight_bits=5)))
    x = torch.randn(4, 2, 5, 5)
    model = integer_only(frozen, x)
    monkeypatch.setattr(integer_module, "_fuse_clamps", lambda graph, modules: None)
    plain = integer_only(frozen, x)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        assert torch.equal(model(x), set_reference_(copy.deepcopy(model))(x))
    kinds = [type(m).__name__ for m in model.children()]
    assert "AlignedAdd" in kinds and "Clamp" not in kinds, kinds


def _conv_outputs(model, x) -> list[torch.Tensor]:
    outs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outs.append(out)) for m in model.modules()
             if isinstance(m, integer_module.IntegerConv)]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return [logits, *outs]


def test_values_are_int32_where_the_formats_leave_room_and_int64_else(monkeypatch):
    # (8, 8) activations, 8 guard bits: every input range at 2**23, 2**8 below int32's
    frozen, x = _frozen("resnet20", deepshift.QConfig(weight_bits=5), (3, 1, 28, 28), 1)
    narrow = _conv_outputs(integer_only(frozen, x), x)
    assert all(t.dtype == torch.int32 for t in narrow[1:]) and len(narrow) == 20
    monkeypatch.setattr(integer_module, "INT32_HEADROOM_BITS", 9)  # now not enough room: int64
    wide = _conv_outputs(integer_only(frozen, x), x)
    assert all(t.dtype == torch.int64 for t in wide[1:])
    for a, b in zip(narrow, wide, strict=True):  # the same integers, the same logits
        assert torch.equal(a.to(b.dtype), b)
    # a format with more than 23 bits at the finest fraction bits keeps int64
    monkeypatch.undo()
    frozen, x = _frozen("resnet20", deepshift.QConfig(weight_bits=5, act_bits=(10, 10)), (3, 1, 28, 28), 1)
    assert all(t.dtype == torch.int64 for t in _conv_outputs(integer_only(frozen, x), x)[1:])


def test_int32_storage_saturates_batchnorm_results_where_the_next_layer_saturates_anyway(monkeypatch):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(2 * 4 * 4, 3)).eval()
    with torch.no_grad():
        net[0].weight.fill_(0.5)
        net[1].weight.fill_(2.0**20)  # results far beyond 2**15, the int32 limit at 16 fraction bits
    frozen = deepshift.freeze_(deepshift.convert_(net, deepshift.QConfig(weight_bits=5)))
    x = torch.rand(2, 1, 4, 4) + 0.5
    narrow = _conv_outputs(integer_only(frozen, x), x)
    monkeypatch.setattr(integer_module, "INT32_HEADROOM_BITS", 9)
    wide = _conv_outputs(integer_only(frozen, x), x)
    assert narrow[1].dtype == torch.int32 and int(narrow[1].max()) == 2**31 - 1
    assert wide[1].dtype == torch.int64 and int(wide[1].max()) > 2**31
    assert torch.equal(narrow[1], wide[1].clamp(max=2**31 - 1).to(torch.int32))
    assert torch.equal(narrow[0], wide[0])  # the Linear's input range (+-128) saturates both alike


class _WithSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return torch.softmax(self.norm(self.fc(x)), -1)


def test_operations_without_an_integer_form_are_named():
    net = deepshift.convert_(_WithSoftmax(), deepshift.QConfig())
    frozen = deepshift.freeze_(net.eval())
    with pytest.raises(ValueError, match=r"norm \(LayerNorm\).*softmax"):
        integer_only(frozen, torch.randn(2, 8))
    with pytest.raises(ValueError, match="needs a frozen model"):
        integer_only(nn.Sequential(nn.Linear(3, 2)), torch.randn(1, 3))
    frozen_ok, x = _frozen("mnist-conv", deepshift.QConfig(), (1, 1, 28, 28))
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="scale_terms"):
            integer_only(frozen_ok, x, scale_terms=bad)
    with pytest.raises(ValueError, match="not its fuse_frozen copy"):
        integer_only(deepshift.fuse_frozen(_frozen("resnet20", deepshift.QConfig(), (1, 3, 32, 32))[0]), x)
    resnet, example = _frozen("resnet20", deepshift.QConfig(), (1, 3, 32, 32))
    with pytest.raises(ValueError, match="averages over 64 positions"):
        integer_only(resnet, example)(torch.randn(1, 3, 40, 40))
    with pytest.raises(TypeError, match="float input"):
        integer_only(frozen_ok, x)(x.to(torch.int64))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        integer_only(frozen_ok, x)(bad)
    bad[0, 0, 0, 0] = float("inf")  # saturates, as in the frozen model
    assert torch.isfinite(integer_only(frozen_ok, x)(bad)).all()


def test_hardtanh_and_relu6_clamp_in_integers():
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU6(), nn.Linear(5, 4), nn.Hardtanh(-0.5, 0.75),
                        nn.Linear(4, 3))
    torch.manual_seed(1)
    frozen = deepshift.freeze_(deepshift.convert_(net, deepshift.QConfig(weight_bits=5)).eval())
    x = torch.randn(16, 6, dtype=torch.float64) * 4
    with torch.no_grad():
        assert torch.equal(integer_only(frozen, x)(x), frozen(x))


def test_the_report_of_an_integer_only_resnet_counts_no_float_work_and_the_same_shift_work():
    frozen, x = _frozen("resnet20", deepshift.QConfig(weight_bits=5), (2, 3, 32, 32))
    before = deepshift.savings_report(frozen, (3, 32, 32))
    after = deepshift.savings_report(integer_only(frozen, x), (3, 32, 32))
    assert before.float_mults_outside > 0 and before.float_adds_outside > 0
    assert after.float_mults_outside == 0 and after.float_adds_outside == 0 and after.float_macs_outside == 0
    assert after.shift_macs == before.shift_macs and len(after.layers) == len(before.layers) == 20
    assert after.packed_weight_bytes == before.packed_weight_bytes


def test_average_pooling_divides_by_a_shift_or_by_a_sum_of_powers_of_two():
    torch.manual_seed(2)
    for pool, exact in ((nn.AvgPool2d(2), True), (nn.AvgPool2d(3, stride=2), False),
                        (nn.AdaptiveAvgPool2d(1), False)):
        net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), pool, nn.Flatten(), nn.LazyLinear(3))
        x = torch.randn(5, 2, 12, 12, dtype=torch.float64)
        net(x.float())  # sizes the lazy layer
        frozen = deepshift.freeze_(deepshift.convert_(net.eval(), deepshift.QConfig(weight_bits=5)))
        with torch.no_grad():
            expected, got = frozen(x), integer_only(frozen, x)(x)
        if exact:  # 2x2 windows: a change of fraction bits, no rounding at all
            assert torch.equal(got, expected)
        else:  # 1/9 and 1/100 to 2**-16: at most a step of the next layer's input rounding
            assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max())


def test_a_packed_file_round_trips_the_integer_only_model(tmp_path):
    frozen, x = _frozen("resnet20", deepshift.PSConfig(weight_bits=4), (3, 1, 28, 28), in_channels=1)
    frozen.zoo_spec = {"name": "resnet20", "kwargs": {"num_classes": 10, "in_channels": 1}}
    path = tmp_path / "int.dshift"
    deepshift.save_packed(frozen, path, integer_only={"input_shape": [1, 28, 28], "scale_terms": 3})
    loaded = deepshift.load_packed(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), integer_only(frozen, x, scale_terms=3)(x))
    assert loaded.integer_recipe == {"input_shape": [1, 28, 28], "scale_terms": 3}
    for bad in ({"input_shape": [1, 28, 28]}, {"input_shape": [], "scale_terms": 2},
                {"input_shape": [1, 28, 28], "scale_terms": 0}, {"input_shape": [1, -2], "scale_terms": 2}):
        with pytest.raises(ValueError, match="integer_only|scale_terms"):
            deepshift.save_packed(frozen, tmp_path / "bad.dshift", integer_only=bad)
    assert not (tmp_path / "bad.dshift").exists()
    with pytest.raises(ValueError, match="not its integer_only form"):
        deepshift.save_packed(loaded, tmp_path / "bad.dshift")


def test_padding_modes_strides_and_groups_run_on_integers_exactly():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, stride=2, padding="valid", groups=2), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, padding="same", padding_mode="circular", dilation=2),
                        nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(3, 2, 11, 11, dtype=torch.float64)
    net(x.float())
    frozen = deepshift.freeze_(deepshift.convert_(net.eval(), deepshift.PSConfig(weight_bits=4)))
    with torch.no_grad():
        assert torch.equal(integer_only(frozen, x)(x), frozen(x))
