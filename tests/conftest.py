"""Shared test fixtures: the layer zoo every core test runs over."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def layer_zoo() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Every convertible layer type, with odd sizes and every convolution option: (layer, input shape)."""
    return {
        "linear": (nn.Linear(7, 5), (3, 7)),
        "linear_3d_batch": (nn.Linear(6, 3, bias=False), (2, 4, 6)),
        "conv1d_stride_pad": (nn.Conv1d(3, 5, 3, stride=2, padding=1), (2, 3, 11)),
        "conv2d_grouped_dilated": (nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2), (2, 4, 9, 7)),
        "conv2d_depthwise": (nn.Conv2d(6, 6, 3, groups=6, padding=1, bias=False), (1, 6, 5, 5)),
        "conv2d_reflect_asym": (nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2),
                                          padding_mode="reflect"), (2, 3, 7, 6)),
        "conv2d_circular_same": (nn.Conv2d(2, 3, 3, padding="same", padding_mode="circular"),
                                 (1, 2, 6, 5)),
        "conv3d": (nn.Conv3d(2, 4, (3, 1, 2), stride=(1, 2, 1), padding=(1, 0, 1)), (1, 2, 5, 6, 4)),
        "convT1d_groups": (nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2, output_padding=1),
                           (2, 4, 5)),
        "convT2d_dilated": (nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, dilation=2), (1, 3, 4, 5)),
        "convT3d": (nn.ConvTranspose3d(2, 3, 2, stride=(2, 1, 1)), (1, 2, 3, 3, 2)),
    }


LAYER_NAMES = list(layer_zoo())


@pytest.fixture
def one_thread():
    """For tests of many small integer ops: with 2 cores shared by parallel runs, OpenMP thread
    hand-offs dominate their time (10x here). One intra-op thread, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_layer(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    layer, shape = layer_zoo()[name]
    return layer.to(dtype), torch.randn(shape, dtype=dtype)


_ISAS: list[str] = []


def isa_paths() -> list[str]:
    """The native kernels' instruction-set paths this CPU runs: "portable" always, "avx2" and
    "avx512" where the CPU has them (``set_isa`` returns the path it really took, so a missing one
    is never rerun as another). Tests loop over these; ``test_every_isa_path`` reports the ones skipped."""
    if not _ISAS:
        from deepshift.backends.cpu import build

        try:
            _ISAS.extend(isa for isa in build.ISAS if build.set_isa(isa) == isa)
        finally:
            build.set_isa("auto")
    return list(_ISAS)
