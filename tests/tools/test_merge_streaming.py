"""The tensor-at-a-time safetensors reader and writer merge and compare rely on."""
from __future__ import annotations

import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kxl_tools.st_io import PlannedTensor, SafetensorsError, SafetensorsReader, StreamingWriter

TENSORS = {
    "f32": torch.randn(3, 4),
    "f16": torch.randn(2, 3).half(),
    "bf16": torch.randn(5).bfloat16(),
    "f64": torch.randn(2).double(),
    "i64": torch.arange(6).reshape(2, 3),
    "u8": torch.arange(7, dtype=torch.uint8),
    "bool": torch.tensor([True, False]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3, dtype=torch.float16),
}


def test_reader_reads_what_safetensors_wrote(tmp_path):
    save_file(TENSORS, str(tmp_path / "x.safetensors"), {"k": "v"})
    r = SafetensorsReader(tmp_path / "x.safetensors")
    assert r.metadata == {"k": "v"}
    assert set(r.keys()) == set(TENSORS)
    for k, v in TENSORS.items():
        got = r.read(k)
        assert got.dtype == v.dtype and torch.equal(got, v), k
    # each read owns its memory: writing into it leaves the next read untouched
    t = r.read("f32")
    t.zero_()
    assert torch.equal(r.read("f32"), TENSORS["f32"])


def test_writer_output_is_read_by_safetensors(tmp_path):
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in TENSORS.items()]
    with StreamingWriter(tmp_path / "y.safetensors", plan, {"m": "1"}) as w:
        for p in plan:
            w.write(p.name, TENSORS[p.name])
    loaded = load_file(str(tmp_path / "y.safetensors"))
    for k, v in TENSORS.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(str(tmp_path / "y.safetensors"), "pt") as f:
        assert f.metadata() == {"m": "1"}
    raw = (tmp_path / "y.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0  # data buffer aligned as safetensors writes it


@pytest.mark.parametrize(
    "writes,message",
    [
        ([("b", torch.zeros(2))], "out of order"),
        ([("a", torch.zeros(3))], "planned"),
        ([("a", torch.zeros(2, dtype=torch.float16))], "planned"),
        ([("a", torch.zeros(2))], "only 1 of 2"),
    ],
)
def test_writer_refuses_and_leaves_no_file(tmp_path, writes, message):
    plan = [PlannedTensor("a", torch.float32, (2,)), PlannedTensor("b", torch.float32, (2,))]
    out = tmp_path / "z.safetensors"
    with pytest.raises(SafetensorsError, match=message):
        with StreamingWriter(out, plan) as w:
            for name, t in writes:
                w.write(name, t)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_reader_rejects_broken_files(tmp_path):
    save_file({"a": torch.zeros(100)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-8])
    with pytest.raises(SafetensorsError, match="do not fit"):
        SafetensorsReader(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(SafetensorsError, match="JSON"):
        SafetensorsReader(tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(SafetensorsError, match="not a safetensors file"):
        SafetensorsReader(tmp_path / "tiny.safetensors")
