"""Offline datasets in their standard on-disk formats, transforms in plain torch, and a batch loader.

Nothing here downloads. Readers:

* ``digits``: scikit-learn's bundled ``load_digits`` (1,797 real 8x8 digits, the embedded default),
  upsampled to 28x28 so the paper's MNIST models run on it. It has no official test split: a fixed,
  seeded 20% is held out as the test set.
* ``mnist`` / ``fashion-mnist``: MNIST idx files (``train-images-idx3-ubyte`` etc., gzipped or not);
  fashion-mnist defaults to Debian's ``dataset-fashion-mnist`` location.
* ``cifar10``: the standard ``cifar-10-batches-py`` pickle batches, read with a restricted
  unpickler that only rebuilds numpy arrays (anything else is rejected: no code runs).
* ``imagefolder``: ImageNet layout ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``,
  decoded lazily with Pillow.
* ``fortunes`` / ``text``: byte-level text for language models (:mod:`deepshift.training.data.text`).

Every split is a :class:`ImageDataset` with ``get_batch(indices, train, generator)``; the
:class:`BatchLoader` draws a permutation and per-batch augmentation that are pure functions of
``(seed, epoch, batch index)``, so a run stopped mid-epoch resumes on exactly the same data.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deepshift.training.data.readers import (
    IMAGE_EXTENSIONS,
    DataCorruptError,
    DatasetNotFoundError,
    _find_idx,
    _scan_folder,
    load_cifar_batch,
    read_idx,
)
from deepshift.training.data.transforms import random_crop_flip, random_resized_crop_params

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder", "fortunes", "text")


FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


# A fixed seed for the held-out splits, independent of the run's --seed, so that runs with
# different seeds are validated and tested on the same examples.
SPLIT_SEED = 20190531


MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)  # the paper's normalisation for MNIST


FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)  # Fashion-MNIST's own training-set statistics


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageDataset:
    """A split: ``len()``, ``num_classes``, ``in_channels``, and ``get_batch`` returning (x, y).

    Subclasses implement ``_load(indices, train, generator)``. ``train=True`` applies the
    random training augmentation drawn from ``generator``; ``train=False`` the fixed eval transform.
    """

    num_classes: int
    in_channels: int
    labels: Tensor
    # Whether a whole batch is cheap to build (held in memory): distributed training then builds
    # every global batch on each rank and slices it, so the augmentation equals one process's.
    in_memory: bool = False
    task = "classify"  # what the model predicts: a class per example (text datasets: "language")

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: Tensor, train: bool, generator: torch.Generator | None = None):
        return self._load(indices, train, generator)

    def _load(self, indices: Tensor, train: bool, generator: torch.Generator | None):
        raise NotImplementedError


class TensorImageDataset(ImageDataset):
    """Images held in memory as a uint8 ``(N, C, H, W)`` tensor (MNIST, Fashion-MNIST, digits, CIFAR).

    Args:
        images: uint8 tensor ``(N, C, H, W)``.
        labels: int64 tensor ``(N,)``.
        num_classes: number of classes.
        mean, std: per-channel normalisation applied after scaling to [0, 1].
        augment: ``None`` (no training augmentation; MNIST-style) or ``"crop-flip"``
            (CIFAR: random crop with 4-pixel zero padding, then random horizontal flip).
    """

    in_memory = True

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, mean, std,
                 augment: str | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 (N, C, H, W) tensor")
        if len(images) != len(labels):
            raise DataCorruptError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.num_classes = num_classes
        self.in_channels = images.shape[1]
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.augment = augment

    def subset(self, indices: Tensor) -> TensorImageDataset:
        """The same dataset restricted to ``indices`` (shares normalisation and augmentation)."""
        out = TensorImageDataset.__new__(TensorImageDataset)
        out.__dict__.update(self.__dict__)
        out.images, out.labels = self.images[indices], self.labels[indices]
        return out

    def _load(self, indices, train, generator):
        x = self.images[indices].float().div_(255.0)
        if train and self.augment == "crop-flip":
            x = random_crop_flip(x, padding=4, generator=generator)
        return (x - self.mean) / self.std, self.labels[indices]


class ImageFolderDataset(ImageDataset):
    """``root/<class>/<image>`` decoded lazily with Pillow (RGB).

    Training transform: random resized crop (scale 0.08-1, ratio 3/4-4/3) to ``image_size`` plus
    random horizontal flip; eval transform: resize the short side to ``image_size * 256 / 224``
    then centre crop ``image_size`` (the paper's ImageNet recipe at 224).
    """

    def __init__(self, files: list[str], labels: list[int], classes: list[str], image_size: int = 224,
                 workers: int = 0):
        self.files = files
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.classes = classes
        self.num_classes = len(classes)
        self.in_channels = 3
        self.image_size = image_size
        self.workers = workers
        self.mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)

    def subset(self, indices: Tensor) -> ImageFolderDataset:
        idx = indices.tolist()
        return ImageFolderDataset([self.files[i] for i in idx], self.labels[indices].tolist(),
                                  self.classes, self.image_size, self.workers)

    def _decode(self, item: tuple[int, bool, tuple | None]) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        index, train, params = item
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                size = self.image_size
                if train:
                    (top, left, h, w), flip = params
                    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
                    if flip:
                        img = img.transpose(Image.FLIP_LEFT_RIGHT)
                else:
                    resize = int(round(size * 256 / 224))
                    w0, h0 = img.size
                    scale = resize / min(w0, h0)
                    img = img.resize((max(size, round(w0 * scale)), max(size, round(h0 * scale))),
                                     Image.BILINEAR)
                    w1, h1 = img.size
                    left, top = (w1 - size) // 2, (h1 - size) // 2
                    img = img.crop((left, top, left + size, top + size))
                arr = np.asarray(img, dtype=np.uint8).copy()
        except (OSError, UnidentifiedImageError) as exc:
            raise DataCorruptError(f"cannot decode image {path}: {exc}") from None
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std

    def _load(self, indices, train, generator):
        from PIL import Image

        items = []
        for i in indices.tolist():
            params = None
            if train:
                # Crop parameters are drawn here, in order, from the batch generator, so they do
                # not depend on the decoding threads' scheduling.
                with Image.open(self.files[i]) as img:
                    width, height = img.size
                params = (random_resized_crop_params(height, width, generator),
                          bool(torch.rand(1, generator=generator) < 0.5))
            items.append((i, train, params))
        if self.workers > 1:
            with ThreadPoolExecutor(self.workers) as pool:  # Pillow releases the GIL while decoding
                xs = list(pool.map(self._decode, items))
        else:
            xs = [self._decode(item) for item in items]
        return torch.stack(xs), self.labels[indices]


@dataclass
class Splits:
    """Train / validation / test splits of one dataset. Validation is held out from training data."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    name: str
    num_classes: int
    in_channels: int

    @property
    def task(self) -> str:
        """``"classify"``, or ``"language"``: (B, T) tokens in, (B, T, vocab) logits out."""
        return self.train.task


def _hold_out(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(keep, held_out) index tensors: a fixed random ``fraction`` of ``range(n)`` is held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * fraction))
    if n > 1 and fraction > 0:
        k = min(max(k, 1), n - 1)
    return perm[k:].sort().values, perm[:k].sort().values


def _split_train(full: TensorImageDataset | ImageFolderDataset, val_fraction: float):
    keep, val = _hold_out(len(full), val_fraction, SPLIT_SEED)
    return full.subset(keep), full.subset(val)


def _limit(ds, limit: int | None):
    if limit is None or limit >= len(ds):
        return ds
    return ds.subset(torch.arange(limit))


def load_mnist_like(name: str, root: str | os.PathLike | None, val_fraction: float = 0.1,
                    limit_train: int | None = None) -> Splits:
    """MNIST or Fashion-MNIST from idx files in ``root`` (gz or not)."""
    if root is None:
        root = FASHION_MNIST_DEBIAN_DIR if name == "fashion-mnist" else None
    if root is None:
        raise DatasetNotFoundError(
            "mnist: no --data-dir given; point it at a folder holding train-images-idx3-ubyte[.gz], "
            "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]")
    root = Path(root)
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [_find_idx(root, s) for s in stems]
    missing = [s for s, p in zip(stems, paths, strict=True) if p is None]
    if missing:
        how = ("install Debian's package: apt-get install dataset-fashion-mnist, or pass --data-dir"
               if name == "fashion-mnist" else "copy the four MNIST idx files there or pass --data-dir")
        raise DatasetNotFoundError(f"{name}: {', '.join(missing)} not found in {root} (gz or not); {how}")
    tr_x, tr_y, te_x, te_y = (read_idx(p) for p in paths)
    for x, y, px in ((tr_x, tr_y, paths[0]), (te_x, te_y, paths[2])):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataCorruptError(f"{px}: images {x.shape} and labels {y.shape} do not match")
    mean, std = (FASHION_MEAN, FASHION_STD) if name == "fashion-mnist" else (MNIST_MEAN, MNIST_STD)

    def make(x, y):
        return TensorImageDataset(torch.from_numpy(x.copy()).unsqueeze(1),
                                  torch.from_numpy(y.astype(np.int64)), 10, mean, std)

    if int(tr_y.max(initial=0)) > 9 or int(te_y.max(initial=0)) > 9:
        raise DataCorruptError(f"{name}: labels outside 0..9 in {root}")
    train, val = _split_train(make(tr_x, tr_y), val_fraction)
    return Splits(_limit(train, limit_train), val, make(te_x, te_y), name, 10, 1)


def load_digits_dataset(val_fraction: float = 0.1, limit_train: int | None = None,
                        size: int = 28) -> Splits:
    """scikit-learn's bundled digits (8x8, values 0..16) upsampled bilinearly to ``size`` x ``size``.

    A fixed 20% is the test set (the dataset has no official split); validation is held out from
    the rest. Normalisation uses the paper's MNIST constants.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetNotFoundError(
            "digits: scikit-learn is not installed; pip install scikit-learn (or deepshift[data])") from None
    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(bunch.target).long()
    full = TensorImageDataset(images, labels, 10, MNIST_MEAN, MNIST_STD)
    rest, test = _hold_out(len(full), 0.2, SPLIT_SEED + 1)
    train, val = _split_train(full.subset(rest), val_fraction)
    return Splits(_limit(train, limit_train), val, full.subset(test), "digits", 10, 1)


def load_cifar10(root: str | os.PathLike | None, val_fraction: float = 0.1,
                 limit_train: int | None = None) -> Splits:
    """CIFAR-10 from a ``cifar-10-batches-py`` folder (``root`` may be the folder or its parent)."""
    how = ("download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html on another "
           "machine, untar it, and pass --data-dir")
    if root is None:
        raise DatasetNotFoundError(f"cifar10: no --data-dir given; {how}")
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DatasetNotFoundError(f"cifar10: {', '.join(missing)} not found in {root}; {how}")
    parts = [load_cifar_batch(root / n) for n in names]
    tr_x = np.concatenate([p[0] for p in parts[:5]])
    tr_y = np.concatenate([p[1] for p in parts[:5]])

    def make(x, y):
        return TensorImageDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), 10,
                                  CIFAR_MEAN, CIFAR_STD, augment="crop-flip")

    train, val = _split_train(make(tr_x, tr_y), val_fraction)
    return Splits(_limit(train, limit_train), val, make(*parts[5]), "cifar10", 10, 3)


def load_imagefolder(root: str | os.PathLike | None, val_fraction: float = 0.1,
                     limit_train: int | None = None, image_size: int = 224, workers: int = 0) -> Splits:
    """ImageNet layout ``root/train/<class>/*`` and ``root/val/<class>/*`` (val/ is the test set)."""
    if root is None:
        raise DatasetNotFoundError("imagefolder: no --data-dir given; pass a folder with train/ and val/ "
                                   "subfolders, one folder per class inside each")
    root = Path(root)
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise DatasetNotFoundError(f"imagefolder: {root / sub} not found; expected "
                                       f"{root}/train/<class>/* and {root}/val/<class>/* (ImageNet layout)")
    files, labels, classes = _scan_folder(root / "train", None)
    if not files:
        raise DatasetNotFoundError(
            f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/train")
    tfiles, tlabels, _ = _scan_folder(root / "val", classes)
    full = ImageFolderDataset(files, labels, classes, image_size, workers)
    train, val = _split_train(full, val_fraction)
    test = ImageFolderDataset(tfiles, tlabels, classes, image_size, workers)
    return Splits(_limit(train, limit_train), val, test, "imagefolder", len(classes), 3)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, val_fraction: float = 0.1,
                 limit_train: int | None = None, image_size: int = 224, workers: int = 0) -> Splits:
    """Train / val / test splits of dataset ``name`` (one of :data:`DATASETS`), read offline.

    Args:
        name: ``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``, ``imagefolder``, ``fortunes`` or
            ``text`` (byte windows for language models; see :mod:`deepshift.training.data.text`).
        data_dir: where the files are (fashion-mnist defaults to Debian's location; digits needs none).
        val_fraction: fraction of the training data held out as the validation split (fixed seed).
        limit_train: keep only the first ``limit_train`` training examples (quick runs).
        image_size: crop size for ``imagefolder``.
        workers: decoding threads for ``imagefolder``.

    Raises:
        DatasetNotFoundError: files missing (the message says where they were looked for).
        DataCorruptError: files present but unreadable.

    Example:
        >>> splits = load_dataset("digits")
        >>> x, y = splits.train.get_batch(torch.arange(4), train=False)
        >>> tuple(x.shape), splits.num_classes
        ((4, 1, 28, 28), 10)
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if name == "digits":
        return load_digits_dataset(val_fraction, limit_train)
    if name in ("mnist", "fashion-mnist"):
        return load_mnist_like(name, data_dir, val_fraction, limit_train)
    if name == "cifar10":
        return load_cifar10(data_dir, val_fraction, limit_train)
    if name == "imagefolder":
        return load_imagefolder(data_dir, val_fraction, limit_train, image_size, workers)
    if name in ("fortunes", "text"):
        from deepshift.training.data.text import load_text

        return load_text(name, data_dir, val_fraction, limit_train)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def default_dataset() -> str:
    """``fashion-mnist`` when Debian's package is installed, else the embedded ``digits``."""
    found = _find_idx(Path(FASHION_MNIST_DEBIAN_DIR), "t10k-labels-idx1-ubyte")
    return "fashion-mnist" if found else "digits"
