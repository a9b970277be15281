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

Every split is a :class:`ShiftDataset` with ``get_batch(indices, train, generator)``; the
:class:`BatchLoader` draws a permutation and per-batch augmentation that are pure functions of
``(seed, epoch, batch index)``, so a run stopped mid-epoch resumes on exactly the same data.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder")
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# A fixed seed for the held-out splits, independent of the run's --seed, so that runs with
# different seeds are validated and tested on the same examples.
SPLIT_SEED = 20190531

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)  # the paper's normalisation for MNIST
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)  # Fashion-MNIST's own training-set statistics
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


class DataError(Exception):
    """Base class of dataset problems; the message is one line meant for the user."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset's files are missing: the message says where they were looked for and how to get them."""


class DataCorruptError(DataError, ValueError):
    """A dataset file exists but cannot be read (truncated, wrong format, unsafe pickle)."""


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class ShiftDataset:
    """A split: ``len()``, ``num_classes``, ``in_channels``, and ``get_batch`` returning (x, y).

    Subclasses implement ``_load(indices, train, generator)``. ``train=True`` applies the
    random training augmentation drawn from ``generator``; ``train=False`` the fixed eval transform.
    """

    num_classes: int
    in_channels: int
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: Tensor, train: bool, generator: torch.Generator | None = None):
        return self._load(indices, train, generator)

    def _load(self, indices: Tensor, train: bool, generator: torch.Generator | None):
        raise NotImplementedError


class TensorImageDataset(ShiftDataset):
    """Images held in memory as a uint8 ``(N, C, H, W)`` tensor (MNIST, Fashion-MNIST, digits, CIFAR).

    Args:
        images: uint8 tensor ``(N, C, H, W)``.
        labels: int64 tensor ``(N,)``.
        num_classes: number of classes.
        mean, std: per-channel normalisation applied after scaling to [0, 1].
        augment: ``None`` (no training augmentation; MNIST-style) or ``"crop-flip"``
            (CIFAR: random crop with 4-pixel zero padding, then random horizontal flip).
    """

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


class ImageFolderDataset(ShiftDataset):
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


# --------------------------------------------------------------------------------------------
# Transforms (plain torch)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


def _mix(*values: int) -> int:
    """A 63-bit seed that is a pure function of the given integers."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class BatchLoader:
    """Batches of a :class:`ShiftDataset`; order and augmentation are pure functions of (seed, epoch).

    Iterating ``loader.epoch(e, start=k)`` yields batches ``k, k+1, ...`` of epoch ``e``, exactly the
    batches an uninterrupted epoch would have produced there; this is what makes mid-epoch resume exact.
    The last partial batch is kept.
    """

    def __init__(self, dataset: ShiftDataset, batch_size: int, train: bool, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.train, self.seed = dataset, batch_size, train, seed

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def order(self, epoch: int) -> Tensor:
        if not self.train:
            return torch.arange(len(self.dataset))
        g = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(len(self.dataset), generator=g)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.order(epoch)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, b, 1)) if self.train else None
            yield self.dataset.get_batch(idx, self.train, g)

    def __iter__(self):
        return self.epoch(0)


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


@dataclass
class Splits:
    """Train / validation / test splits of one dataset. Validation is held out from training data."""

    train: ShiftDataset
    val: ShiftDataset
    test: ShiftDataset
    name: str
    num_classes: int
    in_channels: int


def _open_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataCorruptError(f"cannot read {path}: {exc}") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (MNIST format, optionally .gz) of unsigned bytes into a numpy array."""
    path = Path(path)
    raw = _open_maybe_gz(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataCorruptError(f"{path} is not an idx file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataCorruptError(f"{path}: idx data type 0x{dtype_code:02x} is not supported (need ubyte)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataCorruptError(f"{path} is truncated (incomplete header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape)) if shape else 0
    if len(raw) - header != count:
        raise DataCorruptError(
            f"{path} is truncated or corrupt: expected {count} data bytes for shape {shape}, "
            f"found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    # Both the usual "train-images-idx3-ubyte" and the dotted "train-images.idx3-ubyte" spellings.
    for name in (stem, stem.replace("-idx", ".idx")):
        for folder in (root, root / "raw"):
            candidate = next((c for c in (folder / name, folder / (name + ".gz")) if c.is_file()), None)
            if candidate is not None:
                return candidate
    return None


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


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: rebuilds numpy arrays, lists, dicts, strings, numbers only.

    ``find_class`` is the only way a pickle can reach code; every global other than the few that
    numpy's array reconstruction needs is refused, so a crafted file cannot run anything.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1"): a pure
        # str -> bytes conversion, needed for batches re-saved by Python 3 (the originals are Python 2).
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def load_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One ``cifar-10-batches-py`` batch file: uint8 images ``(N, 3, 32, 32)`` and int64 labels."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataCorruptError(f"{path}: refused or invalid pickle ({exc})") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise DataCorruptError(f"{path}: cannot read CIFAR batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataCorruptError(f"{path}: a CIFAR batch must be a dict, got {type(obj).__name__}")
    obj = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
    data, labels = obj.get("data"), obj.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataCorruptError(f"{path}: missing 'data' array or 'labels' list")
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataCorruptError(f"{path}: expected uint8 data of shape (N, 3072) and N labels, "
                               f"got {data.dtype} {data.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataCorruptError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


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


def _scan_folder(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[int], list[str]]:
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    elif sorted(set(found) - set(classes)):
        raise DataCorruptError(f"{split_dir}: classes {sorted(set(found) - set(classes))} are not in train/")
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for c in found:
        for p in sorted((split_dir / c).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(str(p))
                labels.append(index[c])
    return files, labels, classes


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
        name: ``digits``, ``mnist``, ``fashion-mnist``, ``cifar10`` or ``imagefolder``.
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
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def default_dataset() -> str:
    """``fashion-mnist`` when Debian's package is installed, else the embedded ``digits``."""
    found = _find_idx(Path(FASHION_MNIST_DEBIAN_DIR), "t10k-labels-idx1-ubyte")
    return "fashion-mnist" if found else "digits"


__all__ = [
    "DATASETS", "BatchLoader", "DataCorruptError", "DataError", "DatasetNotFoundError",
    "ImageFolderDataset", "RestrictedUnpickler", "ShiftDataset", "Splits", "TensorImageDataset",
    "default_dataset", "load_cifar10", "load_cifar_batch", "load_dataset", "load_digits_dataset",
    "load_imagefolder", "load_mnist_like", "read_idx",
]
