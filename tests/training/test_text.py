"""The text datasets (fortunes format and plain .txt), language-model training and `generate`."""

from __future__ import annotations

import json

import pytest
import torch

from deepshift.cli import main
from deepshift.training.config import ConfigError, TrainConfig
from deepshift.training.data import load_dataset
from deepshift.training.data.readers import DataCorruptError, DatasetNotFoundError
from deepshift.training.data.text import TextDataset, _documents
from deepshift.training.loop import train


def _fortune_folder(root, records: int = 300):
    root.mkdir()
    text = "".join(f"Saying number {i}: a {'long ' * (i % 7)}line of text.\n\t\t-- Author {i % 13}\n%\n"
                   for i in range(records))
    (root / "quotes").write_text(text)
    (root / "quotes.dat").write_bytes(b"\x00\x01binary index")  # strfile's index: skipped
    return root


def test_documents_split_by_records_or_paragraphs():
    assert _documents(b"one\n%\ntwo\nlines\n%\n") == [b"one\n%\n", b"two\nlines\n%\n"]
    assert _documents(b"para one\nstill\n\npara two\n") == [b"para one\nstill\n\n", b"para two\n"]


def test_fortune_splits_share_no_document(tmp_path):
    splits = load_dataset("fortunes", _fortune_folder(tmp_path / "f"), val_fraction=0.1)
    assert splits.task == "language" and splits.num_classes == 256
    texts = {name: bytes(getattr(splits, name).data.tolist()) for name in ("train", "val", "test")}
    docs = {name: set(_documents(t)) for name, t in texts.items()}
    assert not (docs["train"] & docs["test"]) and not (docs["train"] & docs["val"]) and not (
        docs["val"] & docs["test"])
    assert sum(len(d) for d in docs.values()) == 300  # every record in exactly one split
    assert b"binary index" not in b"".join(texts.values())


def test_windows_and_training_offsets():
    data = torch.arange(100, dtype=torch.uint8)
    ds = TextDataset(data, context=8)
    assert len(ds) == 12  # (100 - 1) // 8 whole windows
    x, y = ds.get_batch(torch.tensor([0, 11]), train=False)
    assert x.dtype == torch.int64 and x.shape == (2, 8) and torch.equal(y, x + 1)
    assert x[0, 0] == 0 and x[1, 0] == 88
    gen = torch.Generator().manual_seed(0)
    xt, yt = ds.get_batch(torch.arange(12), train=True, generator=gen)
    assert torch.equal(yt, xt + 1) and int(xt.max()) <= 98  # shifted windows stay inside the data
    assert not torch.equal(xt, ds.get_batch(torch.arange(12), train=False)[0])


def test_plain_text_file_and_folder(tmp_path):
    paragraphs = "\n\n".join(f"Paragraph {i} says something about number {i}." for i in range(200))
    (tmp_path / "book.txt").write_text(paragraphs)
    one = load_dataset("text", tmp_path / "book.txt")
    folder = load_dataset("text", tmp_path)
    assert len(one.train) == len(folder.train) > 0


def test_bad_text_input_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install fortunes"):
        load_dataset("fortunes", tmp_path / "missing")
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset("text")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no text files"):
        load_dataset("text", tmp_path / "empty")
    (tmp_path / "tiny.txt").write_text("too short\n\nfor windows\n")
    with pytest.raises(DataCorruptError, match="too little text"):
        load_dataset("text", tmp_path / "tiny.txt")
    with pytest.raises(ConfigError, match="does not fit"):
        TrainConfig(data="fortunes", model="mnist-conv").resolved()
    with pytest.raises(ConfigError, match="does not fit"):
        TrainConfig(data="digits", model="char-transformer").resolved()


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    data = _fortune_folder(root / "data", records=400)
    common = dict(data="fortunes", data_dir=str(data), epochs=1, batch_size=8, quiet=True)
    float_metrics = train(TrainConfig(**common, out=str(root / "float")))
    ps_metrics = train(TrainConfig(**common, method="ps", weight_bits=4, limit_train=16,
                                   from_checkpoint=str(root / "float" / "best.pt"), out=str(root / "ps")))
    return root, float_metrics, ps_metrics


def test_language_model_run_reports_perplexity(lm_runs):
    root, float_metrics, ps_metrics = lm_runs
    for m in (float_metrics, ps_metrics):
        assert m["test_perplexity"] == pytest.approx(2.718281828459045 ** m["test_loss"])
        assert 1 < m["test_perplexity"] < 256  # better than uniform over bytes after one epoch
    assert float_metrics["test_perplexity"] < 160  # it learned (uniform over bytes: 256)
    assert json.loads((root / "float" / "metrics.json").read_text())["val_perplexity"] > 1


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_generate_from_float_converted_frozen_and_packed(lm_runs, capsys, tmp_path):
    root = lm_runs[0]
    code, out, err = _cli(capsys, "generate", root / "float", "--prompt", "Saying", "--tokens", 30)
    assert code == 0 and out.startswith("Saying") and "tokens/s (float model" in err
    texts = {}
    for extra in ([], ["--frozen"]):
        code, out, err = _cli(capsys, "generate", root / "ps", "--prompt", "Saying", "--tokens", 30,
                              "--temperature", 0, *extra)
        assert code == 0, err
        texts[err.split("(")[1].split()[0]] = out
    assert set(texts) == {"converted", "frozen"}
    packed = tmp_path / "lm.dshift"
    assert _cli(capsys, "export", root / "ps", "--format", "packed", "-o", packed)[0] == 0
    code, out, err = _cli(capsys, "generate", packed, "--prompt", "Saying", "--tokens", 30,
                          "--temperature", 0)
    assert code == 0 and "frozen model" in err and out == texts["frozen"]  # the same greedy text
    code, out, err = _cli(capsys, "eval", "--packed", packed, "--data", "fortunes",
                          "--data-dir", root / "data", "--quiet")
    assert code == 0 and out.startswith("test perplexity") and "positions" in out, err
    code, out, err = _cli(capsys, "generate", root / "float", "--frozen", "--prompt", "x")
    assert code == 2 and "no shift layers" in err
    code, _, err = _cli(capsys, "generate", root / "float", "--prompt", "")
    assert code == 2 and "--prompt" in err


def test_report_and_onnx_of_a_language_model(lm_runs, capsys, tmp_path):
    root = lm_runs[0]
    code, out, err = _cli(capsys, "report", root / "ps")
    assert code == 0 and "attention" in out
    pytest.importorskip("onnxruntime")
    code, out, err = _cli(capsys, "export", root / "ps", "--format", "onnx", "-o", tmp_path / "lm.onnx")
    assert code == 0, err
