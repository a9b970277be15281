"""Training augmentations on uint8 image tensors, driven by an explicit generator (reproducible and
resumable)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator | None) -> Tensor:
    """Per-image random crop of the original size after zero padding, then random horizontal flip.

    Zero padding is applied before normalisation, as torchvision's ``RandomCrop(32, padding=4)``
    on a PIL image does.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * padding)
    out = padded.gather(2, rows)
    cols = dx.view(n, 1) + torch.arange(w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    cols = cols.view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def random_resized_crop_params(height: int, width: int, generator: torch.Generator | None,
                               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop as in torchvision's RandomResizedCrop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio, generator=generator)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    side = min(height, width)  # fallback: centre crop
    return (height - side) // 2, (width - side) // 2, side, side
