"""Model zoo: every model builds, carries its zoo_spec, runs forward, and takes a shift training step."""

from __future__ import annotations

import pytest
import torch

import deepshift
from deepshift.models import UnknownModelError, build_model, model_names

# (name, input shape, kwargs): small inputs and class counts keep the suite fast.
CASES = [
    ("mnist-fc", (2, 1, 28, 28), {}),
    ("mnist-conv", (2, 1, 28, 28), {}),
    ("resnet20", (2, 3, 32, 32), {}),
    ("resnet32", (2, 3, 16, 16), {}),
    ("resnet44", (1, 3, 8, 8), {}),
    ("resnet56", (1, 3, 8, 8), {}),
    ("resnet110", (1, 3, 8, 8), {}),
    ("resnet18", (2, 3, 16, 16), {"num_classes": 7}),
    ("mobilenetv2", (2, 3, 16, 16), {}),
    ("vgg16", (2, 3, 32, 32), {}),
    ("imagenet-resnet18", (2, 3, 32, 32), {"num_classes": 5}),
    ("imagenet-resnet50", (2, 3, 32, 32), {"num_classes": 5}),
    ("vit", (2, 1, 28, 28), {}),
]


@pytest.mark.parametrize("name,shape,kwargs", CASES, ids=[c[0] for c in CASES])
def test_forward_spec_and_rebuild(name, shape, kwargs):
    model = build_model(name, **kwargs)
    out = model.eval()(torch.randn(shape))
    assert out.shape == (shape[0], kwargs.get("num_classes", 10 if "imagenet" not in name else 1000))
    spec = model.zoo_spec
    assert spec["name"] == name and {"num_classes", "in_channels"} <= set(spec["kwargs"])
    # The spec alone rebuilds an identical architecture (same state_dict keys and shapes).
    again = build_model(spec["name"], **spec["kwargs"])
    assert {k: v.shape for k, v in again.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


def test_paper_layer_sizes():
    fc = build_model("mnist-fc")
    assert [tuple(m.weight.shape) for m in (fc.fc1, fc.fc2, fc.fc3)] == [(512, 784), (512, 512), (10, 512)]
    assert fc.dropout.p == 0.2
    conv = build_model("mnist-conv")
    shapes = [tuple(m.weight.shape) for m in (conv.conv1, conv.conv2, conv.fc1, conv.fc2)]
    assert shapes == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
    # ResNet-20 has the published ~0.27M parameters.
    assert 0.26e6 < sum(p.numel() for p in build_model("resnet20").parameters()) < 0.28e6


@pytest.mark.parametrize("name,method", [("mnist-conv", "ps"), ("resnet20", "q"),
                                         ("mnist-fc", "q")])
def test_one_shift_training_step(name, method):
    model = build_model(name)
    in_ch = model.zoo_spec["kwargs"]["in_channels"]
    x = torch.randn(4, in_ch, 28 if "mnist" in name else 16, 28 if "mnist" in name else 16)
    y = torch.tensor([0, 1, 2, 3])
    cfg = deepshift.PSConfig(weight_bits=5) if method == "ps" else deepshift.QConfig(weight_bits=5)
    deepshift.convert_(model, cfg)
    opt = torch.optim.RAdam(deepshift.param_groups(model, lr=0.01))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = torch.nn.functional.cross_entropy(model.train()(x), y)
    loss.backward()
    opt.step()
    deepshift.clamp_parameters_(model)
    assert torch.isfinite(loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("original" in k for k in changed)  # the shift parameters themselves were trained


def test_in_channels_and_unknown_name():
    m = build_model("resnet20", in_channels=1, num_classes=3)
    assert m(torch.randn(1, 1, 8, 8)).shape == (1, 3)
    with pytest.raises(UnknownModelError, match="mnist-conv"):
        build_model("resnet21")
    names = model_names()
    assert "imagenet-resnet50" in names and "vgg16" in names


def test_torchvision_models_only_when_installed():
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(UnknownModelError, match="torchvision"):
            build_model("torchvision:alexnet")
    else:
        m = build_model("torchvision:alexnet", num_classes=4)
        assert m.zoo_spec == {"name": "torchvision:alexnet", "kwargs": {"num_classes": 4, "in_channels": 3}}
