"""freeze_'s runtime-independent float layers: BatchNorm as multiply-then-add, exact global pooling."""

import copy

import pytest
import torch
from conftest import isa_paths
from torch import nn

import deepshift
from deepshift.frozen.float_layers import ExactGlobalAvgPool, FrozenBatchNorm, freeze_float_layers_
from deepshift.models import build_model


def _trained_looking(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3.0)
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm1d, (4, 6)), (nn.BatchNorm1d, (4, 6, 5)),
                                        (nn.BatchNorm2d, (3, 6, 5, 7)), (nn.BatchNorm3d, (2, 6, 3, 4, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_frozen_batchnorm_is_eval_batchnorm_and_keeps_the_state_dict(cls, shape, affine):
    torch.manual_seed(0)
    bn = _trained_looking(cls(6, eps=1e-3, affine=affine))
    frozen = FrozenBatchNorm.from_batchnorm(bn)
    assert list(frozen.state_dict()) == list(bn.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)
    # Exactly the documented arithmetic: float64 constants rounded once, then multiply, then add.
    scale = bn.running_var.double().add(1e-3).sqrt().reciprocal()
    if affine:
        scale = bn.weight.double() * scale
    shift = -bn.running_mean.double() * scale + (bn.bias.double() if affine else 0)
    view = (1, -1) + (1,) * (len(shape) - 2)
    assert torch.equal(frozen(x), x * scale.float().view(view) + shift.float().view(view))
    # A BatchNorm state dict loads into it and vice versa.
    other = FrozenBatchNorm(6, 1e-3, affine)
    other.load_state_dict(bn.state_dict())
    assert torch.equal(other(x), frozen(x))
    with pytest.raises(ValueError, match=r"\(N, 6, \.\.\.\)"):
        frozen(torch.randn(2, 5, 3))
    # The cached affine follows in-place changes of the statistics (load_state_dict, copy_).
    before = frozen(x)
    stats = {k: v.clone() for k, v in frozen.state_dict().items()}
    stats["running_mean"] += 1.0
    frozen.load_state_dict(stats)
    moved = FrozenBatchNorm.from_batchnorm(bn)
    moved.running_mean.add_(1.0)
    assert torch.equal(frozen(x), moved(x)) and not torch.equal(frozen(x), before)


def test_exact_global_pool_is_the_float64_mean_in_any_order():
    torch.manual_seed(0)
    # Magnitudes spread so that float32 sums would depend on the order.
    x = torch.randn(3, 4, 9, 7) * torch.logspace(-3, 3, 7)
    pool = ExactGlobalAvgPool(2)
    y = pool(x)
    assert y.shape == (3, 4, 1, 1)
    assert torch.equal(y, x.double().mean(dim=(2, 3), keepdim=True).float())
    perm = torch.randperm(63)
    shuffled = x.flatten(2)[:, :, perm].reshape(3, 4, 9, 7)
    assert torch.equal(pool(shuffled), y)
    torch.testing.assert_close(y, nn.AdaptiveAvgPool2d(1)(x))
    assert torch.equal(ExactGlobalAvgPool(1)(x.flatten(2)), x.double().mean(dim=(2, 3)).float().unsqueeze(-1))


def test_freeze_replaces_only_what_it_can_make_exact():
    torch.manual_seed(0)
    shared = _trained_looking(nn.BatchNorm2d(4))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.ReLU(), shared,
                        nn.BatchNorm2d(4, track_running_stats=False),  # batch statistics: left alone
                        nn.AdaptiveAvgPool2d(2), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(4, 2))
    deepshift.convert_(net, deepshift.QConfig())
    x = torch.randn(2, 3, 8, 8)
    kept = deepshift.freeze_(copy.deepcopy(net).eval(), float_layers=False)
    assert isinstance(kept[1], nn.BatchNorm2d) and isinstance(kept[6], nn.AdaptiveAvgPool2d)
    frozen = deepshift.freeze_(net.eval())
    assert isinstance(frozen[1], FrozenBatchNorm) and frozen[1] is frozen[3]
    assert type(frozen[4]) is nn.BatchNorm2d
    assert type(frozen[5]) is nn.AdaptiveAvgPool2d  # not global: unchanged
    assert isinstance(frozen[6], ExactGlobalAvgPool)
    torch.testing.assert_close(frozen(x), kept(x), rtol=1e-4, atol=1e-4)
    assert isinstance(freeze_float_layers_(_trained_looking(nn.BatchNorm1d(3))), FrozenBatchNorm)


def test_packed_file_reloads_into_the_same_frozen_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _trained_looking(m)
    model = deepshift.convert_(model, deepshift.PSConfig(weight_bits=4)).eval()
    frozen = deepshift.freeze_(copy.deepcopy(model))
    path = tmp_path / "r.dshift"
    deepshift.save_packed(model, path)
    loaded = deepshift.load_packed(path)
    assert sum(isinstance(m, FrozenBatchNorm) for m in loaded.modules()) == 19
    assert sum(isinstance(m, ExactGlobalAvgPool) for m in loaded.modules()) == 1
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(loaded(x), frozen(x))
    # The savings report counts the frozen BatchNorm like the original one.
    a = deepshift.savings_report(model, (3, 32, 32))
    b = deepshift.savings_report(loaded, (3, 32, 32))
    assert (a.float_mults_outside, a.float_adds_outside, a.other_float_params) == (
        b.float_mults_outside, b.float_adds_outside, b.other_float_params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frozen_batchnorm_native_pass_equals_multiply_then_add(dtype):
    # One native pass in eager mode; bit for bit torch.mul then torch.add (no fused multiply-add:
    # on ~10^4 random products an FMA would differ in the last bit somewhere), specials included.
    from deepshift.backends.cpu import build

    ext = build.load_extension()
    if ext is None:
        pytest.skip("native kernels unavailable (no compiler / DEEPSHIFT_NO_NATIVE)")
    torch.manual_seed(1)
    bn = FrozenBatchNorm.from_batchnorm(_trained_looking(nn.BatchNorm2d(7)))
    bn.running_var.mul_(1e-3)  # large scales: products far from the shifts' magnitude
    x = (torch.randn(3, 7, 9, 11, dtype=torch.float64) * 50).to(dtype)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-40, 3e38], dtype=dtype)
    x.view(-1)[:: 13][: specials.numel()] = specials
    scale, shift = (t.view(-1, 1, 1) for t in bn.affine(dtype))
    expected = torch.add(torch.mul(x, scale), shift)
    for isa in isa_paths():
        assert build.set_isa(isa) == isa
        try:
            got = bn(x)
        finally:
            build.set_isa("auto")
        assert torch.equal(got.nan_to_num(0.5), expected.nan_to_num(0.5)) and torch.equal(got.isnan(),
                                                                                           expected.isnan())
        assert got.dtype == dtype
    # The op's CPU kernel is the extension's (C++, one native pass), not a Python one.
    cpu = [line for line in torch._C._dispatch_dump_table("deepshift::channel_affine").splitlines()
           if line.startswith("CPU:")]
    assert len(cpu) == 1 and "csrc/frozen.cpp" in cpu[0], cpu
    # Non-contiguous input: the same values.
    xt = x.transpose(2, 3)
    assert torch.equal(bn(xt).nan_to_num(0.5), torch.add(torch.mul(xt, scale), shift).nan_to_num(0.5))


def test_batchnorm_on_another_device_is_torchs_error_not_a_crash():
    # The native pass takes CPU tensors only: statistics elsewhere fall back to torch, which raises
    # its usual device-mismatch error (here "meta" stands for any other device).
    bn = FrozenBatchNorm.from_batchnorm(nn.BatchNorm2d(3).eval()).to("meta")
    with pytest.raises(RuntimeError, match="device"):
        bn(torch.randn(2, 3, 4, 4))
