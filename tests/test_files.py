"""atomic_path: every file deepshift writes appears whole, with ordinary permissions, or not at all."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from torch import nn

import deepshift
from deepshift.files import atomic_path
from deepshift.training.checkpoint import save_checkpoint


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640  # what open() gives a new file under this umask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_permissions_of_ordinary_new_files(tmp_path, umask_027):
    model = deepshift.convert_(nn.Sequential(nn.Linear(4, 3)), deepshift.PSConfig()).eval()
    deepshift.save_packed(model, tmp_path / "m.dshift")
    save_checkpoint({"x": torch.ones(2)}, tmp_path / "c.pt")
    (tmp_path / "plain").write_text("")  # the reference: a file made with open()
    files = {"m.dshift", "c.pt", "plain"}
    if _has_onnx():
        deepshift.export_onnx(deepshift.freeze_(model), torch.randn(1, 4), tmp_path / "m.onnx")
        files.add("m.onnx")
    assert {p.name for p in tmp_path.iterdir()} == files  # no temporary file left
    assert {p.name: _mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(files, umask_027)


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_the_temporary_keeps_the_suffix_and_the_folder(tmp_path):
    with atomic_path(tmp_path / "curves.png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".png") and tmp.name != "curves.png"
        tmp.write_bytes(b"x")
    assert (tmp_path / "curves.png").read_bytes() == b"x"
