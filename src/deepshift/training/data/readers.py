"""Readers of the on-disk formats: MNIST idx (optionally gzipped), CIFAR-10 batches (no pickle code
runs), image folders; and the errors bad or missing data raise."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np


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



IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


class DataError(Exception):
    """Base class of dataset problems; the message is one line meant for the user."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset's files are missing: the message says where they were looked for and how to get them."""


class DataCorruptError(DataError, ValueError):
    """A dataset file exists but cannot be read (truncated, wrong format, unsafe pickle)."""
