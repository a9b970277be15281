"""Text for byte-level language models: files read offline, split by document, cut into windows.

* ``fortunes``: Debian's ``fortunes`` package (``/usr/share/games/fortunes``: 2.5 MB of English
  quotations, literature, poems and jokes in ``%``-separated records; ``apt-get install fortunes``).
* ``text``: any ``.txt`` file, or every ``.txt`` file under a folder (``--data-dir``).

Tokens are bytes (256 symbols), so any encoding works and nothing needs a vocabulary file. A
document is one ``%``-separated record, or, for files without such records, one paragraph
(blank-line separated). A fixed seeded 10% of documents is the test split and ``val_fraction`` of
the rest the validation split, so the three splits never share a document. Each split's
documents are joined in file order and cut into windows of ``context + 1`` bytes (the model reads
``context`` bytes and predicts each next one); training windows start at a random offset drawn
per batch, so every epoch sees differently aligned windows.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

from deepshift.training.data.readers import DataCorruptError, DatasetNotFoundError

FORTUNES_DEBIAN_DIR = "/usr/share/games/fortunes"


TEXT_DATASETS = ("fortunes", "text")


DEFAULT_CONTEXT = 128


TEST_FRACTION = 0.1


class TextDataset:
    """Windows over one split's bytes: ``get_batch`` gives ``(x, y)``, both int64 ``(B, context)``,
    ``y`` being ``x`` shifted by one byte. ``len()`` is the number of whole windows."""

    num_classes = 256
    in_channels = 1
    task = "language"
    in_memory = True

    def __init__(self, data: Tensor, context: int, starts: Tensor | None = None):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ValueError("data must be a 1-D uint8 tensor of bytes")
        self.data, self.context = data, context
        count = max((len(data) - 1) // context, 0)
        self.starts = torch.arange(count) * context if starts is None else starts

    def __len__(self) -> int:
        return len(self.starts)

    def subset(self, indices: Tensor) -> TextDataset:
        return TextDataset(self.data, self.context, self.starts[indices])

    def get_batch(self, indices: Tensor, train: bool, generator: torch.Generator | None = None):
        starts = self.starts[indices]
        if train:
            # A random shift within one window, kept inside the data.
            shift = torch.randint(0, self.context, (len(starts),), generator=generator)
            starts = (starts + shift).clamp(max=len(self.data) - self.context - 1)
        window = self.data[starts.view(-1, 1) + torch.arange(self.context + 1)].long()
        return window[:, :-1], window[:, 1:]


_RECORD = re.compile(rb"(?m)^%\r?\n")
_PARAGRAPH = re.compile(rb"\n[ \t\r]*\n")


def _documents(raw: bytes) -> list[bytes]:
    """``%``-separated records (each keeps its separator line) or blank-line separated paragraphs."""
    if _RECORD.search(raw):
        parts = _RECORD.split(raw)
        return [p + b"%\n" for p in parts if p.strip()]
    ends = [m.end() for m in _PARAGRAPH.finditer(raw)]
    bounds = [0, *ends, len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if raw[a:b].strip()]


def _text_files(name: str, root: str | os.PathLike | None) -> list[Path]:
    if name == "fortunes":
        folder = Path(root or FORTUNES_DEBIAN_DIR)
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"fortunes: {folder} not found; install Debian's package (apt-get install fortunes) or "
                "pass --data-dir to a folder of fortune files")
        # The fortune files have no extension; .dat/.u8 are strfile's indexes, subfolders
        # (the "off" collection) are left out.
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.suffix)
    else:
        if root is None:
            raise DatasetNotFoundError(
                "text: no --data-dir given; pass a .txt file or a folder of .txt files")
        path = Path(root)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        else:
            raise DatasetNotFoundError(f"text: {path} not found")
    if not files:
        raise DatasetNotFoundError(f"{name}: no text files in {root or FORTUNES_DEBIAN_DIR}")
    return files


def load_text(name: str, root: str | os.PathLike | None, val_fraction: float = 0.1,
              limit_train: int | None = None, context: int = DEFAULT_CONTEXT):
    """Train / val / test :class:`TextDataset` splits of ``fortunes`` or ``text`` (see module doc)."""
    from deepshift.training.data.datasets import Splits, _hold_out

    docs: list[bytes] = []
    for path in _text_files(name, root):
        try:
            docs += _documents(path.read_bytes())
        except OSError as exc:
            raise DataCorruptError(f"cannot read {path}: {exc}") from None
    rest, test = _hold_out(len(docs), TEST_FRACTION, 20190531 + 2)
    keep, val = _hold_out(len(rest), val_fraction, 20190531 + 3)

    def split(indices: Tensor) -> TextDataset:
        raw = b"".join(docs[i] for i in indices.tolist())
        if not raw:
            return TextDataset(torch.zeros(0, dtype=torch.uint8), context)
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return TextDataset(data, context)

    train, val_ds, test_ds = split(rest[keep]), split(rest[val]), split(test)
    needed = {"train": train} | ({"validation": val_ds} if val_fraction > 0 else {}) | {"test": test_ds}
    short = [k for k, ds in needed.items() if len(ds) == 0]
    if short:
        raise DataCorruptError(f"{name}: too little text for one {context + 1}-byte window in the "
                               f"{', '.join(short)} split ({len(docs)} documents in all)")
    if limit_train is not None and limit_train < len(train):
        train = train.subset(torch.arange(limit_train))
    return Splits(train, val_ds, test_ds, name, 256, 1)
