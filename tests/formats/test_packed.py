"""save_packed / load_packed: exact reload, file size, and every kind of bad file -> PackedFormatError."""

from __future__ import annotations

import json
import os
import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import deepshift
from deepshift import PackedFormatError
from deepshift.formats.packed import _seal
from deepshift.frozen.layers import ShiftConvNd, ShiftLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _user_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(6), nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5),
    )


def _trained(method: str = "ps", bits: int = 5) -> nn.Module:
    torch.manual_seed(0)
    model = _user_model()
    cfg = deepshift.PSConfig(weight_bits=bits) if method == "ps" else deepshift.QConfig(weight_bits=bits)
    deepshift.convert_(model, cfg)
    model.train()
    model(torch.randn(8, 3, 4, 4))  # BatchNorm statistics that differ from their defaults
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = _trained()
    path = tmp_path / "model.safetensors"
    deepshift.save_packed(model, path)
    return model, path


@pytest.mark.parametrize("method", ["q", "ps"])
@pytest.mark.parametrize("skeleton", ["float", "converted", "frozen"])
def test_round_trip_reproduces_outputs_exactly(tmp_path, method, skeleton):
    model = _trained(method, bits=4)
    path = tmp_path / "m.safetensors"
    deepshift.save_packed(model, path)
    assert deepshift.shift_layers(model), "save_packed must not change the model"
    x = torch.randn(3, 3, 4, 4)
    expected = deepshift.freeze_(model)(x)
    blank = _user_model()
    if skeleton == "converted":
        deepshift.convert_(blank, deepshift.QConfig())
    elif skeleton == "frozen":
        blank = deepshift.freeze_(deepshift.convert_(blank, deepshift.QConfig(weight_bits=4)))
    loaded = deepshift.load_packed(path, model=blank)
    assert isinstance(loaded[0], ShiftConvNd) and isinstance(loaded[6], ShiftLinear)
    assert not loaded.training
    assert torch.equal(loaded(x), expected)
    assert torch.equal(loaded[1].running_mean, model[1].running_mean)
    # A plain safetensors reader sees the same tensors: the format is standard safetensors.
    safetensors_torch = pytest.importorskip("safetensors.torch")
    plain = safetensors_torch.load_file(str(path))
    assert torch.equal(plain["0.codes"], loaded[0].codes)


def test_post_training_act_bits_are_stored(tmp_path):
    model = _trained("q")
    deepshift.save_packed(model, tmp_path / "m.safetensors", act_bits=(6, 6))
    loaded = deepshift.load_packed(tmp_path / "m.safetensors", model=_user_model())
    assert loaded[0].act_bits == (6, 6)
    assert loaded[0].config == deepshift.shift_config(model[0]).to_dict()


def test_zoo_model_size_and_reload_without_skeleton(tmp_path):
    models = pytest.importorskip("deepshift.models")
    torch.manual_seed(0)
    net = models.build_model("mnist-conv")
    deepshift.convert_(net, deepshift.PSConfig(weight_bits=5))
    path = tmp_path / "mnist.safetensors"
    size = deepshift.save_packed(net, path)
    report = deepshift.compression_report(net)
    n = report["shift_weights"]
    assert n == sum(m.weight.numel() for m in [net.conv1, net.conv2, net.fc1, net.fc2])
    other = sum(m.bias.numel() * 4 for m in [net.conv1, net.conv2, net.fc1, net.fc2])  # int32 biases
    assert report["other_bytes"] == other
    assert size == path.stat().st_size
    assert size <= 1.02 * (n * 5 / 8 + other + 4096)
    assert report["weight_ratio"] == pytest.approx(6.4, abs=1e-3)
    assert report["total_ratio"] > 6
    loaded = deepshift.load_packed(path)  # no skeleton: rebuilt from the stored zoo spec
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded(x), deepshift.freeze_(net)(x))


def test_zoo_spec_is_used_when_present(tmp_path, monkeypatch):
    calls = []

    def fake_build(spec):
        calls.append(spec)
        return _user_model()

    model = _trained()
    model.zoo_spec = {"name": "my-net", "kwargs": {"width": 6}}
    deepshift.save_packed(model, tmp_path / "z.safetensors")
    monkeypatch.setattr("deepshift.formats.packed._build_zoo_model", fake_build)
    loaded = deepshift.load_packed(tmp_path / "z.safetensors")
    assert calls == [{"name": "my-net", "kwargs": {"width": 6}}]
    assert isinstance(loaded[0], ShiftConvNd)


def test_without_zoo_spec_a_skeleton_is_required(saved):
    _, path = saved
    with pytest.raises(PackedFormatError, match="skeleton"):
        deepshift.load_packed(path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    deepshift.save_packed(_trained(), tmp_path / "a.safetensors")
    deepshift.save_packed(_trained("q"), tmp_path / "a.safetensors")  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


# ---- bad files -------------------------------------------------------------------------------


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _rebuild(header: dict, data: bytes) -> bytes:
    """A file with this header and data and a *valid* checksum: tests the checks behind it."""
    header = dict(header)
    meta = dict(header["__metadata__"])
    meta["deepshift_sha256"] = "0" * 64
    header["__metadata__"] = meta
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text) - 8) % 8)
    return _seal(text, data)


def _load_blob(tmp_path, blob: bytes, model: nn.Module | None = None):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    return deepshift.load_packed(p, model=_user_model() if model is None else model)


def test_rebuild_helper_makes_loadable_files(saved, tmp_path):
    _, path = saved
    header, data = _split(path.read_bytes())
    _load_blob(tmp_path, _rebuild(header, data))  # no error: the checks below are not vacuous
    deepshift.load_packed(path.read_bytes(), model=_user_model())  # bytes work as well as paths


@pytest.mark.parametrize("cut", [0, 5, 8, 40, -1, -100])
def test_truncated(saved, tmp_path, cut):
    _, path = saved
    blob = path.read_bytes()
    with pytest.raises(PackedFormatError):
        _load_blob(tmp_path, blob[:cut])


@pytest.mark.parametrize("where", ["data", "header", "length"])
def test_flipped_byte(saved, tmp_path, where):
    _, path = saved
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    pos = {"data": 8 + n + 3, "header": 8 + n // 2, "length": 1}[where]
    blob[pos] ^= 0x10
    with pytest.raises(PackedFormatError):
        _load_blob(tmp_path, bytes(blob))


def test_flipped_code_bit_is_caught_by_checksum(saved, tmp_path):
    _, path = saved
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1  # the last tensor's last byte
    with pytest.raises(PackedFormatError, match="checksum"):
        _load_blob(tmp_path, bytes(blob))


def test_wrong_format_version(saved, tmp_path):
    _, path = saved
    header, data = _split(path.read_bytes())
    meta = json.loads(header["__metadata__"]["deepshift"])
    meta["version"] = 2
    header["__metadata__"]["deepshift"] = json.dumps(meta)
    with pytest.raises(PackedFormatError, match="version"):
        _load_blob(tmp_path, _rebuild(header, data))


def test_header_lies_about_tensor_shape(saved, tmp_path):
    _, path = saved
    header, data = _split(path.read_bytes())
    header["0.codes"]["shape"] = [header["0.codes"]["shape"][0] + 1]
    with pytest.raises(PackedFormatError, match="bytes"):
        _load_blob(tmp_path, _rebuild(header, data))


def test_header_lies_about_offsets(saved, tmp_path):
    _, path = saved
    header, data = _split(path.read_bytes())
    with pytest.raises(PackedFormatError, match="truncated"):
        _load_blob(tmp_path, _rebuild(header, data[:-4]))


def test_layer_spec_lies_about_weight_shape(saved, tmp_path):
    _, path = saved
    header, data = _split(path.read_bytes())
    meta = json.loads(header["__metadata__"]["deepshift"])
    meta["layers"]["0"]["weight_shape"] = [6, 3, 3, 4]
    header["__metadata__"]["deepshift"] = json.dumps(meta)
    with pytest.raises(PackedFormatError, match="weights"):
        _load_blob(tmp_path, _rebuild(header, data))


def test_not_our_files(tmp_path):
    for blob in [b"", b"hello world, not a model\n" * 10, bytes(range(256)) * 4,
                 struct.pack("<Q", 2) + b"{}", struct.pack("<Q", 2**62) + b"{}"]:
        with pytest.raises(PackedFormatError):
            _load_blob(tmp_path, blob)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    other = tmp_path / "other.safetensors"
    safetensors_torch.save_file({"w": torch.ones(3)}, str(other))
    with pytest.raises(PackedFormatError, match="not a deepshift"):
        deepshift.load_packed(other, model=_user_model())


def test_model_mismatch(saved, tmp_path):
    _, path = saved
    wrong = nn.Sequential(nn.Conv2d(3, 7, 3), nn.Identity())
    with pytest.raises(PackedFormatError, match="match"):
        deepshift.load_packed(path, model=wrong)


# ---- fuzz ------------------------------------------------------------------------------------

_SMALL = None


def _small_file() -> bytes:
    """A small packed file (so thousands of loads stay fast), cached across examples."""
    global _SMALL
    if _SMALL is None:
        import tempfile
        from pathlib import Path

        torch.manual_seed(0)
        model = deepshift.convert_(_small_model(), deepshift.PSConfig(weight_bits=3))
        with tempfile.TemporaryDirectory() as d:
            deepshift.save_packed(model, Path(d) / "s.safetensors")
            _SMALL = (Path(d) / "s.safetensors").read_bytes()
    return _SMALL


def _small_model() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 3, 3, groups=1), nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(6, 2))


_SUM = re.compile(rb'"deepshift_sha256":"[0-9a-f]{64}"')


def _reseal(blob: bytes) -> bytes:
    """Recompute the checksum of a mutated file where possible, so mutations reach deeper checks."""
    if len(blob) < 8:
        return blob
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        return blob
    header = blob[8 : 8 + n]
    if len(_SUM.findall(header)) != 1:
        return blob
    header = _SUM.sub(b'"deepshift_sha256":"' + b"0" * 64 + b'"', header)
    try:
        return _seal(header, blob[8 + n :])
    except ValueError:
        return blob


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=5)
    | st.sampled_from([0, 1, -1, 2**31, 2**63, 8, 255]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def _mutated(draw) -> bytes:
    blob = bytearray(_small_file())
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "json"]))
    if kind == "json":  # a semantic change of the deepshift header, with a valid checksum
        header, data = _split(bytes(blob))
        meta = json.loads(header["__metadata__"]["deepshift"])
        target = meta
        keys = []
        # Usually descend to a leaf (a layer spec field), sometimes stop higher up.
        while isinstance(target, dict) and target and draw(st.integers(0, 5)) > 0:
            key = draw(st.sampled_from(sorted(target)))
            keys.append(key)
            target = target[key]
        node = meta
        for key in keys[:-1]:
            node = node[key]
        if keys:
            node[keys[-1]] = draw(_JSON_VALUES)
        else:
            meta = draw(_JSON_VALUES)
        header["__metadata__"]["deepshift"] = json.dumps(meta)
        return _rebuild(header, data)
    pos = draw(st.integers(0, len(blob) - 1))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 3))):
            blob[draw(st.integers(0, len(blob) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del blob[pos:]
    elif kind == "insert":
        blob[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        del blob[pos : pos + draw(st.integers(1, 16))]
    else:
        chunk = draw(st.binary(min_size=1, max_size=16))
        blob[pos : pos + len(chunk)] = chunk
    return _reseal(bytes(blob)) if draw(st.booleans()) else bytes(blob)


# 10,000 mutated files in every test run (~25 s); `make fuzz` runs 100,000 (DEEPSHIFT_FUZZ_EXAMPLES).
FUZZ_EXAMPLES = int(os.environ.get("DEEPSHIFT_FUZZ_EXAMPLES", "10000"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=_mutated())
def test_fuzz_only_packed_format_error_escapes(blob):
    try:  # from bytes: the same code path as from a file, minus thousands of disk writes
        model = deepshift.load_packed(blob, model=_small_model())
    except PackedFormatError:
        return
    # A mutation that loads (e.g. of the unused zoo entry) still yields the frozen layers.
    assert isinstance(model[0], ShiftConvNd) and isinstance(model[3], ShiftLinear)


@pytest.mark.parametrize("field,value", [("accumulator", "int32"), ("shift_hi", -14), ("method", "q"),
                                         ("act_bits", [16, 16])])
def test_header_lies_about_layer_semantics(saved, tmp_path, field, value):
    # The small layers fit int32 already; force a case where int64 is needed, then lie.
    model = _trained()
    path = tmp_path / "wide.safetensors"
    deepshift.save_packed(model, path, act_bits=(16, 16))
    header, data = _split(path.read_bytes())
    meta = json.loads(header["__metadata__"]["deepshift"])
    spec = meta["layers"]["6"]
    assert spec["accumulator"] == "int64" and spec["shift_hi"] > -14 and spec["act_bits"] == [16, 16]
    spec[field] = value
    if field == "act_bits":  # the bias no longer fits the smaller fixed point the header states
        spec[field] = [2, 0]
    header["__metadata__"]["deepshift"] = json.dumps(meta)
    with pytest.raises(PackedFormatError, match="'6'"):
        _load_blob(tmp_path, _rebuild(header, data))


def test_shared_layer_round_trip(tmp_path):
    def make():
        shared = nn.Linear(3, 3)
        return nn.Sequential(shared, nn.ReLU(), shared)

    model = deepshift.convert_(make(), deepshift.QConfig())
    deepshift.save_packed(model, tmp_path / "s.safetensors")
    loaded = deepshift.load_packed(tmp_path / "s.safetensors", model=make())
    x = torch.randn(4, 3)
    assert torch.equal(loaded(x), deepshift.freeze_(model)(x))
