"""Datasets for training: MNIST-format files, Fashion-MNIST (Debian), scikit-learn's digits, CIFAR-10,
image folders; all loaded into memory, split reproducibly, batched by :class:`BatchLoader`.

Example:
    >>> from deepshift.training.data import load_dataset
    >>> splits = load_dataset("digits", limit_train=100)   # needs scikit-learn
    >>> len(splits.train), splits.num_classes
    (100, 10)
"""

from deepshift.training.data.datasets import (
    CIFAR_MEAN,
    CIFAR_STD,
    DATASETS,
    FASHION_MEAN,
    ImageDataset,
    ImageFolderDataset,
    Splits,
    TensorImageDataset,
    default_dataset,
    load_dataset,
)
from deepshift.training.data.loader import BatchLoader
from deepshift.training.data.readers import (
    DataCorruptError,
    DataError,
    DatasetNotFoundError,
    load_cifar_batch,
    read_idx,
)
from deepshift.training.data.transforms import random_crop_flip

__all__ = [
    "CIFAR_MEAN", "CIFAR_STD", "DATASETS", "FASHION_MEAN", "BatchLoader", "DataCorruptError", "DataError",
    "DatasetNotFoundError", "ImageDataset", "ImageFolderDataset", "Splits", "TensorImageDataset",
    "default_dataset", "load_cifar_batch", "load_dataset", "random_crop_flip", "read_idx",
]
