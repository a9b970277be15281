"""Dataset readers on tiny fixtures written in exactly the on-disk formats they read."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from deepshift.training import data as D


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    """An idx file as distributed by MNIST: magic (0, 0, 0x08 ubyte, ndim), big-endian dims, bytes."""
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def make_mnist_dir(root, n_train=40, n_test=12, gz=True, spelling="-idx"):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    for stem, arr in arrays.items():
        write_idx(root / stem.replace("-idx", spelling), arr, gz)
    return arrays


def make_cifar_dir(root, per_batch=6):
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batches[name] = (data, labels)
        # The real batches are Python-2 pickles with bytes keys; write the same shape of object.
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"fixture", b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
    return folder, batches


def make_image_folder(root, size=(20, 14)):
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, count in (("train", 3), ("val", 2)):
        for c, ext in (("cat", ".png"), ("dog", ".jpg")):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(d / f"{i}{ext}")


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_reader_shapes_labels(tmp_path, gz):
    arrays = make_mnist_dir(tmp_path, gz=gz)
    splits = D.load_dataset("mnist", tmp_path, val_fraction=0.25)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 12)
    x, y = splits.test.get_batch(torch.arange(12), train=False)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # Normalisation is the paper's MNIST one: pixel 0 maps to -mean/std.
    raw0 = torch.tensor(arrays["t10k-images-idx3-ubyte"][0], dtype=torch.float32) / 255
    torch.testing.assert_close(x[0, 0], (raw0 - 0.1307) / 0.3081)
    # Train and validation partition the training file (no example in both, none lost).
    all_train = torch.cat([splits.train.labels, splits.val.labels]).sort().values
    assert all_train.tolist() == sorted(arrays["train-labels-idx1-ubyte"].tolist())


def test_fashion_mnist_dotted_spelling_and_stats(tmp_path):
    make_mnist_dir(tmp_path, spelling=".idx", gz=False)
    splits = D.load_dataset("fashion-mnist", tmp_path)
    assert splits.name == "fashion-mnist" and splits.in_channels == 1
    assert torch.allclose(splits.train.mean.flatten(), torch.tensor(D.FASHION_MEAN))


def test_missing_dataset_is_one_clear_line(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.load_dataset("fashion-mnist", tmp_path / "nowhere")
    msg = str(err.value)
    assert "\n" not in msg and "nowhere" in msg and "dataset-fashion-mnist" in msg
    with pytest.raises(D.DatasetNotFoundError, match="cifar.html"):
        D.load_dataset("cifar10", tmp_path)
    with pytest.raises(D.DatasetNotFoundError, match="train"):
        D.load_dataset("imagefolder", tmp_path)


def test_truncated_and_corrupt_idx(tmp_path):
    make_mnist_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(D.DataCorruptError, match="truncated"):
        D.load_dataset("mnist", tmp_path)
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(D.DataCorruptError, match="magic"):
        D.read_idx(path)
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(D.DataCorruptError):
        D.read_idx(bad_gz)


def test_digits_embedded_default():
    splits = D.load_dataset("digits")
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    x, y = splits.train.get_batch(torch.arange(5), train=True, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 28, 28) and 0 <= int(y.min()) and int(y.max()) <= 9


def test_cifar_reader_and_augmentation(tmp_path):
    _, batches = make_cifar_dir(tmp_path)
    splits = D.load_dataset("cifar10", tmp_path, val_fraction=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 6)
    x, y = splits.test.get_batch(torch.arange(6), train=False)
    assert x.shape == (6, 3, 32, 32)
    assert y.tolist() == batches["test_batch"][1]
    # Row-major CHW layout of CIFAR: the first 1024 bytes are the red plane.
    red = torch.tensor(batches["test_batch"][0][0, :1024].reshape(32, 32), dtype=torch.float32) / 255
    torch.testing.assert_close(x[0, 0], (red - D.CIFAR_MEAN[0]) / D.CIFAR_STD[0])
    # Augmentation is a pure function of the generator, and it really crops/flips.
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a1, _ = splits.test.get_batch(torch.arange(6), train=True, generator=g())
    a2, _ = splits.test.get_batch(torch.arange(6), train=True, generator=g())
    assert torch.equal(a1, a2) and not torch.equal(a1, x)


def test_random_crop_flip_matches_manual_crop():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(5)
    out = D.random_crop_flip(x, padding=1, generator=g)
    g = torch.Generator().manual_seed(5)
    dy, dx = torch.randint(0, 3, (2,), generator=g), torch.randint(0, 3, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        ref = padded[i, :, dy[i]:dy[i] + 4, dx[i]:dx[i] + 4]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_rejects_code(tmp_path):
    folder, _ = make_cifar_dir(tmp_path)
    evil = folder / "data_batch_3"
    with open(evil, "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Evil()}, f, protocol=2)
    with pytest.raises(D.DataCorruptError, match="not allowed"):
        D.load_dataset("cifar10", tmp_path)
    # Globals that would be harmless are refused too: only numpy array reconstruction is allowed.
    with open(evil, "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"s": {1, 2}.__class__}, f)
    with pytest.raises(D.DataCorruptError, match="builtins"):
        D.load_cifar_batch(evil)
    evil.write_bytes(b"\x80\x02}q")  # truncated pickle
    with pytest.raises(D.DataCorruptError):
        D.load_cifar_batch(evil)


def test_imagefolder_png_jpeg(tmp_path):
    make_image_folder(tmp_path)
    splits = D.load_dataset("imagefolder", tmp_path, val_fraction=0.34, image_size=16, workers=2)
    assert splits.num_classes == 2 and len(splits.test) == 4
    assert len(splits.train) + len(splits.val) == 6
    x, y = splits.test.get_batch(torch.arange(4), train=False)
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 1, 1]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    t1, _ = splits.train.get_batch(torch.arange(len(splits.train)), train=True, generator=g())
    t2, _ = splits.train.get_batch(torch.arange(len(splits.train)), train=True, generator=g())
    assert t1.shape[1:] == (3, 16, 16) and torch.equal(t1, t2)
    # A corrupt image gives a DataCorruptError naming the file.
    bad = tmp_path / "val" / "cat" / "0.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(D.DataCorruptError, match="0.png"):
        splits.test.get_batch(torch.arange(1), train=False)


def test_batch_loader_order_is_pure_function_of_seed_epoch():
    splits = D.load_dataset("digits", limit_train=50)
    loader = D.BatchLoader(splits.train, 16, train=True, seed=7)
    full = list(loader.epoch(2))
    assert len(full) == len(loader) == 4 and len(full[-1][1]) == 2
    tail = list(loader.epoch(2, start=2))  # what a resumed epoch sees
    for (xa, ya), (xb, yb) in zip(full[2:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(loader.order(2), loader.order(3))
    seen = torch.cat([y for _, y in full]).sort().values
    assert torch.equal(seen, splits.train.labels.sort().values)
    # Iterating the loader itself walks epochs 0, 1, ...: each pass reshuffles.
    fresh = D.BatchLoader(splits.train, 16, train=True, seed=7)
    for e in range(2):
        for (xa, ya), (xb, yb) in zip(fresh, loader.epoch(e), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("kind", ["mnist", "cifar10", "imagefolder", "digits"])
def test_one_training_step_per_reader(tmp_path, kind):
    from deepshift.models import build_model

    if kind == "mnist":
        make_mnist_dir(tmp_path)
    elif kind == "cifar10":
        make_cifar_dir(tmp_path)
    elif kind == "imagefolder":
        make_image_folder(tmp_path)
    splits = D.load_dataset(kind, tmp_path, val_fraction=0.2, image_size=16, limit_train=32)
    name = "mnist-conv" if splits.in_channels == 1 else "resnet20"
    model = build_model(name, num_classes=splits.num_classes, in_channels=splits.in_channels)
    x, y = next(iter(D.BatchLoader(splits.train, 8, train=True, seed=0)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and y.max() < splits.num_classes
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
