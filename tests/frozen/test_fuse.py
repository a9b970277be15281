"""fuse_frozen / ShiftConvBatchNorm: which chains are fused, and the same numbers either way."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepshift
from deepshift.backends.cpu import build
from deepshift.models import build_model


def _frozen(model: nn.Module, cfg=None) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
    deepshift.convert_(model, cfg or deepshift.QConfig(weight_bits=5, act_bits=(4, 4)))
    return deepshift.freeze_(model.eval())


def _fused_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, deepshift.ShiftConvBatchNorm)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 5])
def test_resnet20_fused_equals_unfused(dtype, batch):
    net = _frozen(build_model("resnet20")).to(dtype)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fused = deepshift.fuse_frozen(net)
    kinds = collections.Counter(m.relu for m in fused.modules()
                                if isinstance(m, deepshift.ShiftConvBatchNorm))
    assert kinds == {True: 19}  # the stem and both convs of every block, each with its ReLU
    assert not any(isinstance(m, deepshift.FrozenBatchNorm) and not n.endswith(".1")
                   for n, m in fused.named_modules())
    # 9 residual adds (one per block) went into the second conv of each block.
    assert sum(n.op == "call_module" and len(n.args) == 2 for n in fused.graph.nodes) == 9
    x = torch.randn(batch, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(fused(x), net(x))
    # The original is unchanged and shares nothing; every tensor is kept, under the fused names.
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    after = fused.state_dict()
    assert len(after) == len(state)
    assert torch.equal(after["layers.0.conv1.1.running_var"], state["layers.0.bn1.running_var"])
    assert torch.equal(after["conv1.0.codes"], state["conv1.codes"])
    assert after["conv1.0.codes"].data_ptr() != net.conv1.codes.data_ptr()


class _Patterns(nn.Module):
    """conv -> bn -> relu (fusable); conv whose output is also used elsewhere; bn after a non-conv;
    a conv called twice; a transposed conv before a bn; conv -> bn -> += residual (fusable); a
    residual += conv -> bn (fusable too: fx traces += as an add); a write into the conv's input
    between conv and bn."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn_c = nn.BatchNorm2d(4)
        self.d, self.bn_d = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.t, self.bn_t = nn.ConvTranspose2d(4, 4, 1), nn.BatchNorm2d(4)
        self.e, self.bn_e = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.f, self.bn_f = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.g, self.bn_g = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.bn_a(self.a(x)))
        y = self.b(x)
        x = self.bn_b(y) + y  # b's output has two users
        x = self.bn_c(F.relu(x))  # not after a conv
        x = self.bn_d(self.d(x)) + self.d(x)  # d is called twice
        x = self.bn_t(self.t(x))
        out = self.bn_e(self.e(x))
        out += x.sigmoid()  # fused: e -> bn_e -> add
        r = out * 2
        r += self.bn_f(self.f(out))  # fused: f -> bn_f -> add
        z = self.g(r)
        r.mul_(3)  # a write into g's input between g and bn_g: not fused
        return torch.relu(self.bn_g(z)) + r


def _fused_modules(model):
    return {n: m.relu for n, m in model.named_modules() if isinstance(m, deepshift.ShiftConvBatchNorm)}


def test_only_exclusive_chains_are_fused():
    net = _frozen(_Patterns())
    fused = deepshift.fuse_frozen(net)
    assert _fused_modules(fused) == {"a": True, "e": False, "f": False}
    residual_calls = [n.target for n in fused.graph.nodes if n.op == "call_module" and len(n.args) == 2]
    assert residual_calls == ["e", "f"]
    x = torch.randn(2, 3, 7, 9)
    with torch.no_grad():
        assert torch.equal(fused(x), net(x))


def test_module_registered_twice_is_not_fused():
    conv = nn.Conv2d(3, 4, 3)
    net = nn.Sequential(conv, nn.BatchNorm2d(4))
    net.alias = conv  # the same conv under a second name
    assert _fused_modules(deepshift.fuse_frozen(_frozen(net))) == {}


def test_untraceable_model_comes_back_unfused_with_a_warning():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.bn(self.conv(x))
            return self.conv(x)

    net = _frozen(Dynamic())
    with pytest.warns(UserWarning, match="cannot trace Dynamic"):
        out = deepshift.fuse_frozen(net)
    assert type(out) is Dynamic and out is not net and isinstance(out.bn, deepshift.FrozenBatchNorm)


def _conv_bn(cfg=None):
    net = _frozen(nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)), cfg)
    return net, deepshift.ShiftConvBatchNorm(net[0], net[1], relu=True)


def test_hooks_native_off_and_int64_take_the_two_modules():
    net, fused = _conv_bn()
    x = torch.randn(3, 3, 11, 10)
    with torch.no_grad():
        expected = torch.relu(net(x))
        seen = []
        handle = fused[1].register_forward_hook(lambda m, a, o: seen.append(o.shape))
        assert torch.equal(fused(x), expected) and seen == [expected.shape]  # hooks fire
        handle.remove()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DEEPSHIFT_NO_NATIVE", "1")
            build.reset_state()
            assert build.load_extension() is None
            assert torch.equal(fused(x), expected)
        build.reset_state()
        # Unbatched input: the two modules, whatever they make of it.
        assert torch.equal(fused(x[0]), torch.relu(net(x[0])))
    wide, wide_fused = _conv_bn(deepshift.QConfig(weight_bits=8, act_bits=(16, 16)))
    assert wide[0].accumulator == "int64"
    with torch.no_grad():
        assert torch.equal(wide_fused(x), torch.relu(wide(x)))


def test_statistics_changed_after_first_call_and_nan():
    net, fused = _conv_bn()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        fused(x)
        fused[1].running_mean.add_(1.5)  # in place: the cached affine must follow
        assert torch.equal(fused(x), torch.relu(net(x)))
        x[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            fused(x)


def test_bad_pairs_are_rejected():
    net, _ = _conv_bn()
    with pytest.raises(TypeError, match="ShiftConvNd"):
        deepshift.ShiftConvBatchNorm(nn.Conv2d(3, 6, 3), net[1])
    with pytest.raises(TypeError, match="FrozenBatchNorm"):
        deepshift.ShiftConvBatchNorm(net[0], nn.BatchNorm2d(6))
    other = deepshift.FrozenBatchNorm(5, 1e-5)
    with pytest.raises(ValueError, match="5 features"):
        deepshift.ShiftConvBatchNorm(net[0], other)


# imagenet-resnet18 at 112 px: its max pool (input 64 x 56 x 56) takes ChannelsLastMaxPool2d's fast path.
@pytest.mark.parametrize("name,size", [("resnet20", 32), ("imagenet-resnet18", 112)])
def test_fused_model_exports_to_onnx_and_reports_like_the_unfused(tmp_path, name, size):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is an optional extra (deepshift[onnx])")
    net = _frozen(build_model(name))
    fused = deepshift.fuse_frozen(net)
    x = torch.randn(2, 3, size, size)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deepshift.export_onnx(fused, x, path)
    got = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        assert torch.equal(got, net(x))
    a, b = deepshift.savings_report(net, (3, size, size)), deepshift.savings_report(fused, (3, size, size))
    drop = ("layers",)  # layer names differ (conv1 -> conv1.0); every count must not
    assert {k: v for k, v in a.to_dict().items() if k not in drop} == \
        {k: v for k, v in b.to_dict().items() if k not in drop}
    # Every layer's count under its own name: a fused conv is child 0 of its ShiftConvBatchNorm (the
    # fused copy may also list a block's shortcut conv in another place).
    fused_parents = {n for n, m in fused.named_modules() if isinstance(m, deepshift.ShiftConvBatchNorm)}
    unfused = {r["name"]: r["macs"] for r in a.to_dict()["layers"]}
    renamed = {r["name"][:-2] if r["name"][:-2] in fused_parents else r["name"]: r["macs"]
               for r in b.to_dict()["layers"]}
    assert renamed == unfused and len(unfused) == len(a.to_dict()["layers"])


def test_save_packed_refuses_a_fused_model(tmp_path):
    net, _ = _conv_bn()
    fused = deepshift.fuse_frozen(net)
    assert _fused_modules(fused) == {"0": False}
    with pytest.raises(ValueError, match="save the frozen model"):
        deepshift.save_packed(fused, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_shapes_dtypes_and_layouts(dtype):
    # The native epilogue takes a residual of the output's shape, dtype and layout; anything else
    # (broadcasting, promotion, strides) goes through torch, with torch's result.
    net, fused = _conv_bn()
    net, fused = net.to(dtype), fused.to(dtype)
    x = torch.randn(3, 3, 11, 10, dtype=dtype)
    with torch.no_grad():
        y = net(x)
        for r in (torch.randn_like(y), torch.randn(6, 1, 1, dtype=dtype),
                  torch.randn_like(y, dtype=torch.float64),
                  torch.randn(y.shape[::-1], dtype=dtype).permute(3, 2, 1, 0), -y):
            assert torch.equal(fused(x, r), torch.relu(y + r))
        # Values the epilogue must keep as torch does: -0.0 through ReLU, exact cancellation.
        out = fused(x, -y)
        assert torch.equal(torch.signbit(out), torch.signbit(torch.relu(y + -y)))


def test_chain_shortened_where_the_conv_would_move_past_an_in_place_write():
    class Block(nn.Module):  # torchvision's order: the shortcut first, an in-place ReLU in between
        def __init__(self):
            super().__init__()
            self.down, self.bn_down = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.c1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            identity = self.bn_down(self.down(x))
            out = self.relu(self.bn1(self.c1(x)))
            return self.relu(out + identity)

    net = _frozen(Block())
    fused = deepshift.fuse_frozen(net)
    # down -> bn_down -> add -> relu would move `down` past the in-place ReLU: BatchNorm only.
    assert _fused_modules(fused) == {"down": False, "c1": True}
    x = torch.randn(2, 3, 6, 7)
    with torch.no_grad():
        assert torch.equal(fused(x), net(x))


@pytest.mark.parametrize("name", ["mnist-conv", "resnet20", "resnet18", "mobilenetv2", "vgg16",
                                  "imagenet-resnet18", "imagenet-resnet50"])
def test_every_zoo_model_fuses_and_keeps_its_outputs(name):
    net = _frozen(build_model(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every zoo model must be traceable
        fused = deepshift.fuse_frozen(net)
    size = 28 if name.startswith("mnist") else 64 if name.startswith("imagenet") else 32
    x = torch.randn(2, 1 if name.startswith("mnist") else 3, size, size)
    with torch.no_grad():
        assert torch.equal(fused(x), net(x))
    # Every BatchNorm that directly follows a conv went in (mnist-conv has none).
    bns = sum(isinstance(m, deepshift.FrozenBatchNorm) for m in net.modules())
    assert sum(isinstance(m, deepshift.ShiftConvBatchNorm) for m in fused.modules()) == bns


@pytest.mark.parametrize("write", ["out", "method"])
def test_a_write_between_conv_and_bn_blocks_the_fusion(write):
    class Writes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            x = x * 1.0
            y = self.conv(x)
            # Written after the conv read it: the conv must not move below this.
            if write == "out":
                torch.add(x, 1.0, out=x)
            else:
                x.clamp_(min=0.0)
            return self.bn(y) + x.sum()

    net = _frozen(Writes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced, not given up on
        fused = deepshift.fuse_frozen(net)
    assert _fused_modules(fused) == {}
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(fused(x), net(x))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, NaN where the other has NaN, and the same signs of zeros."""
    return (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
            and torch.equal(a.signbit(), b.signbit()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", [
    (3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 1, 1, 1, False), (3, 2, 1, 2, True),
    ((2, 3), (1, 2), (1, 0), 1, True),
])
def test_channels_last_max_pool_equals_torch(dtype, kernel, stride, padding, dilation, ceil_mode,
                                             monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 13, 10, dtype=dtype).round()  # rounded: ties between window elements
    specials = {(0, 1, 2, 3): "nan", (1, 2, 5, 5): "inf", (2, 0, 0, 0): "-inf", (2, 4, 7, 2): "-0.0"}
    for at, value in specials.items():
        x[at] = float(value)
    ref = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    fast = deepshift.ChannelsLastMaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    assert x.numel() < fast.MIN_ELEMENTS
    assert _same_values(fast(x), ref(x))  # small: nn.MaxPool2d's own forward
    monkeypatch.setattr(deepshift.ChannelsLastMaxPool2d, "MIN_ELEMENTS", 0)  # now the channels-last path
    y = fast(x)
    assert y.is_contiguous() and y.dtype == dtype and _same_values(y, ref(x))
    # Inputs it does not take go to nn.MaxPool2d's forward: unbatched, or with indices.
    assert _same_values(fast(x[0]), ref(x[0]))
    with_indices = deepshift.ChannelsLastMaxPool2d(kernel, stride, padding, dilation, return_indices=True,
                                                   ceil_mode=ceil_mode)
    expected = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)[1]
    assert torch.equal(with_indices(x)[1], expected)


def test_fuse_frozen_swaps_max_pools_and_keeps_outputs():
    net = _frozen(build_model("imagenet-resnet50"))
    fused = deepshift.fuse_frozen(net)
    assert type(fused.maxpool) is deepshift.ChannelsLastMaxPool2d
    assert type(net.maxpool) is nn.MaxPool2d  # the original is unchanged
    # A pool with hooks stays itself (as a hooked conv or BatchNorm is not fused): the hooks still run.
    seen = []
    net.maxpool.register_forward_hook(lambda m, a, y: seen.append(y.shape))
    hooked = deepshift.fuse_frozen(net)
    assert type(hooked.maxpool) is nn.MaxPool2d
    with torch.no_grad():
        hooked(torch.randn(1, 3, 64, 64))
    assert seen == [torch.Size([1, 64, 16, 16])]
    x = torch.randn(1, 3, 112, 112)  # the pool's input, 64 x 56 x 56, takes the channels-last path
    assert 64 * 56 * 56 >= deepshift.ChannelsLastMaxPool2d.MIN_ELEMENTS
    with torch.no_grad():
        assert torch.equal(fused(x), net(x))
