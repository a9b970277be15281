"""Model zoo: the paper's models, built by name.

``build_model(name, num_classes=..., in_channels=..., **kwargs)`` returns a fresh float model whose
attribute ``zoo_spec = {"name": name, "kwargs": {...every argument...}}`` is enough to rebuild it
(``build_model(spec["name"], **spec["kwargs"])``), e.g. when loading a packed file.

Names: ``mnist-fc``, ``mnist-conv`` (the paper's MNIST models, 28x28 inputs), CIFAR
``resnet20/32/44/56/110``, ``resnet18`` (CIFAR variant), ``mobilenetv2``, ``vgg16``; ImageNet
``imagenet-resnet18``, ``imagenet-resnet50``; transformers (:mod:`deepshift.models.transformer`):
``vit`` (28x28 images) and ``char-transformer`` (a byte-level language model); and, when
torchvision is installed, any
``torchvision.models`` name as ``torchvision:<name>`` (e.g. ``torchvision:alexnet``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from deepshift.models.cifar import CifarMobileNetV2, CifarResNet, CifarResNet18, CifarVGG16
from deepshift.models.imagenet import resnet18 as _imagenet_resnet18
from deepshift.models.imagenet import resnet50 as _imagenet_resnet50
from deepshift.models.mnist import MnistConv, MnistFC
from deepshift.models.transformer import CharTransformer, VisionTransformer


class UnknownModelError(ValueError):
    """The model name is not in the registry (the message lists the known names)."""


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
    def make(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return CifarResNet(depth, num_classes, in_channels)

    return make


# name -> (factory, default in_channels, default num_classes)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], int, int]] = {
    "mnist-fc": (MnistFC, 1, 10),
    "mnist-conv": (MnistConv, 1, 10),
    **{f"resnet{d}": (_cifar_resnet(d), 3, 10) for d in (20, 32, 44, 56, 110)},
    "resnet18": (CifarResNet18, 3, 10),
    "mobilenetv2": (CifarMobileNetV2, 3, 10),
    "vgg16": (CifarVGG16, 3, 10),
    "imagenet-resnet18": (_imagenet_resnet18, 3, 1000),
    "imagenet-resnet50": (_imagenet_resnet50, 3, 1000),
    "vit": (VisionTransformer, 1, 10),
    "char-transformer": (CharTransformer, 1, 256),
}
TORCHVISION_PREFIX = "torchvision:"


def _torchvision_models():
    try:
        import torchvision.models as tvm  # optional: only used when it imports cleanly
    except Exception:  # a broken torchvision (e.g. a wheel built for another torch) counts as absent
        return None
    return tvm


def model_names() -> list[str]:
    """Names accepted by :func:`build_model` (torchvision names only when torchvision imports)."""
    names = sorted(_REGISTRY)
    tvm = _torchvision_models()
    if tvm is not None:
        names += [TORCHVISION_PREFIX + n for n in sorted(tvm.list_models(module=tvm))]
    return names


def build_model(name: str, num_classes: int | None = None, in_channels: int | None = None,
                **kwargs: Any) -> nn.Module:
    """Build a fresh float model by name; the result carries ``model.zoo_spec``.

    Args:
        name: a registered name (see module docstring) or ``torchvision:<name>``.
        num_classes: output classes (default: 10 for MNIST/CIFAR models, 1000 for ImageNet).
        in_channels: input channels (default: 1 for MNIST models, 3 otherwise; torchvision
            models accept only 3).
        **kwargs: extra model arguments (e.g. ``image_size`` for the MNIST models).

    Example:
        >>> m = build_model("mnist-conv")
        >>> m.zoo_spec
        {'name': 'mnist-conv', 'kwargs': {'num_classes': 10, 'in_channels': 1}}
    """
    if name in _REGISTRY:
        factory, default_in, default_classes = _REGISTRY[name]
        spec_kwargs = {"num_classes": default_classes if num_classes is None else int(num_classes),
                       "in_channels": default_in if in_channels is None else int(in_channels), **kwargs}
        model = factory(**spec_kwargs)
    elif name.startswith(TORCHVISION_PREFIX):
        tvm = _torchvision_models()
        tv_name = name[len(TORCHVISION_PREFIX):]
        if tvm is None:
            raise UnknownModelError(f"model {name!r} needs torchvision, which is not installed")
        if tv_name not in tvm.list_models(module=tvm):
            raise UnknownModelError(f"unknown torchvision model {tv_name!r}")
        if in_channels not in (None, 3):
            raise UnknownModelError(f"torchvision models take 3 input channels, not {in_channels}")
        spec_kwargs = {"num_classes": 1000 if num_classes is None else int(num_classes), "in_channels": 3,
                       **kwargs}
        tv_kwargs = {k: v for k, v in spec_kwargs.items() if k != "in_channels"}
        model = tvm.get_model(tv_name, weights=None, **tv_kwargs)
    else:
        raise UnknownModelError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    model.zoo_spec = {"name": name, "kwargs": dict(spec_kwargs)}
    return model


def input_shape(name: str, image_size: int = 224) -> tuple[int, ...]:
    """The input shape (without the batch dimension) a zoo model is made for.

    Example:
        >>> input_shape("mnist-conv"), input_shape("resnet20")
        ((1, 28, 28), (3, 32, 32))
    """
    if name.startswith("mnist-") or name == "vit":
        return (1, 28, 28)
    if name == "char-transformer":
        return (128,)  # a window of byte tokens (int64), not an image
    if name.startswith(("imagenet-", TORCHVISION_PREFIX)):
        return (3, image_size, image_size)
    return (3, 32, 32)  # the CIFAR zoo


def example_input(name: str, batch: int = 1, image_size: int = 224):
    """A zero input batch for zoo model ``name``: float images, or int64 tokens for a language model.

    Example:
        >>> example_input("char-transformer").dtype, tuple(example_input("vit", 2).shape)
        (torch.int64, (2, 1, 28, 28))
    """
    import torch

    dtype = torch.int64 if name in LANGUAGE_MODELS else torch.float32
    return torch.zeros((batch, *input_shape(name, image_size)), dtype=dtype)


# Zoo models that read (batch, time) int64 tokens rather than images.
LANGUAGE_MODELS = ("char-transformer",)


__all__ = ["LANGUAGE_MODELS", "UnknownModelError", "build_model", "example_input", "input_shape",
           "model_names"]
