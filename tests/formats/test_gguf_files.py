"""GGUF files as they come: `inspect` of a converted model and of one holding a type llmconv cannot read, and
damaged files (truncated, lying tensor table, unknown type, wrong magic or version) refused with exit 2,
naming the file, writing nothing."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from llmconv.formats import registry

TRAINED_GPT2 = Path(__file__).resolve().parents[2] / "fixtures" / "models" / "trained-gpt2"
Q4_K = gguf.GGMLQuantizationType.Q4_K


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], raw: dict | None = None) -> Path:
    """A GGUF file through the gguf package's writer; ``raw``: name -> (bytes, byte shape, GGML type)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_name("test")
    for name, array in tensors.items():
        w.add_tensor(name, array)
    for name, (nbytes, byte_shape, kind) in (raw or {}).items():
        w.add_tensor(name, np.zeros(nbytes, np.uint8), raw_shape=byte_shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def inspect_json(cli, path: Path) -> dict:
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def refused(cli, *args: object) -> str:
    """Exit 2 and the message, for `llmconv *args`."""
    r = cli(*args)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    return r.stderr


def test_inspect_a_converted_gpt2(cli, tmp_path, monkeypatch):
    path = tmp_path / "gpt2.gguf"
    assert cli("convert", TRAINED_GPT2, path, "--no-verify").exit_code == 0  # the converter's tests verify
    scratch = tmp_path / "scratch"  # where the reader puts the config and tokenizer it builds
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    info = inspect_json(cli, path)
    assert info["format"] == "gguf" and info["weights_format"] == "gguf" and info["files"] == ["gpt2.gguf"]
    assert info["gguf_architecture"] == "gpt2" and info["architecture"] == "GPT2LMHeadModel"
    assert info["model_type"] == "gpt2" and info["gguf_version"] == 3
    assert info["gguf_types"] == {"F32": 28} and info["unreadable_types"] == []
    assert info["gguf_type_bytes"] == {"F32": info["bytes"]}  # lm_head is the embedding, stored once
    assert info["tensors"] == 28 and info["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    meta = info["gguf_metadata"]
    assert meta["general.architecture"] == "gpt2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["gpt2.block_count"] == 2 and meta["gpt2.embedding_length"] == 128
    tokens = meta["tokenizer.ggml.tokens"]
    assert isinstance(tokens, str) and "1024 items" in tokens
    assert "config.json" in info["extra_files"] and "tokenizer.json" in info["extra_files"]
    assert list(scratch.glob("llmconv-*")) == []  # the reader's scratch folder is removed on close

    r = cli("inspect", path, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.stderr
    lines = [line.rstrip() for line in r.stdout.splitlines()]
    assert any(line.split() == ["architecture", "gpt2", "(GGUF", "v3,", "reads", "back", "as", "GPT2LMHeadModel)"]
               for line in lines)
    assert any(line.split()[:4] == ["gguf", "types", "F32", "28"] for line in lines)
    assert any(line.split()[:2] == ["tokenizer.ggml.model", "gpt2"] for line in lines)
    assert any(line.startswith("tokenizer.ggml.tokens") and "[1024 items: '<|endoftext|>'" in line for line in lines)
    assert "unreadable" not in r.stdout


def test_unreadable_type_is_listed_by_inspect_and_refused_by_convert(cli, tmp_path):
    # Q4_K: 256 values a block, 144 bytes; two rows of 256.
    path = write_gguf(tmp_path / "k.gguf", "llama", {"a.weight": np.ones(32, np.float32)},
                      raw={"blk.0.q.weight": (2 * 144, (2, 144), Q4_K)})
    with registry.detect(path).open(path) as src:  # headers only: opening does not dequantize
        assert src.infos["blk.0.q.weight"].shape == (2, 256)
    info = inspect_json(cli, path)
    assert info["gguf_types"] == {"F32": 1, "Q4_K": 1} and info["unreadable_types"] == ["Q4_K"]
    assert info["gguf_type_bytes"] == {"F32": 128, "Q4_K": 288} and info["gguf_architecture"] == "llama"
    r = cli("inspect", path, env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert any(line.split() == ["gguf", "types", "F32", "1", "(128", "B),", "Q4_K", "1", "(288", "B)"]
               for line in r.stdout.splitlines())
    assert any(line.split()[:2] == ["unreadable", "Q4_K"] for line in r.stdout.splitlines())

    out = tmp_path / "out"
    out.mkdir()
    message = refused(cli, "convert", path, out / "k.safetensors")
    assert "Q4_K" in message and "blk.0.q.weight" in message and str(path) in message
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------------------------------- damaged


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[bytes, gguf.GGUFReader]:
    """A valid GPT-2 GGUF's bytes and its reader (tensor data offsets 0, 512, 640)."""
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf", "gpt2", {
        "token_embd.weight": np.ones((16, 8), np.float32), "position_embd.weight": np.ones((4, 8), np.float32),
        "output_norm.weight": np.ones(8, np.float32)})
    return path.read_bytes(), gguf.GGUFReader(path)


def _part_at(tensor, k: int) -> int:
    """Byte position in the file of part ``k`` of a tensor's entry in the tensor-info table
    (name length, name, n_dims, dims, type, offset)."""
    return tensor.field.offset + sum(p.nbytes for p in tensor.field.parts[:k])


def _patched(raw: bytes, fmt: str, at: int, value: int, expect: int | None = None) -> bytes:
    b = bytearray(raw)
    if expect is not None:
        assert struct.unpack_from(fmt, b, at)[0] == expect
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def _damaged(kind: str, raw: bytes, reader) -> bytes:
    tensors = list(reader.tensors)
    rel = [t.data_offset - reader.data_offset for t in tensors]
    assert rel == [0, 512, 640] and len(raw) == reader.data_offset + 672
    if kind == "truncated in tensor data":
        return raw[:reader.data_offset + 100]
    if kind == "truncated in metadata":
        return raw[:tensors[0].field.offset // 2]
    if kind == "truncated in tensor table":
        return raw[:tensors[0].field.offset + 10]
    if kind == "offset past the end":
        return _patched(raw, "<Q", _part_at(tensors[2], 5), 4096, expect=640)
    if kind == "overlapping tensors":
        return _patched(raw, "<Q", _part_at(tensors[1], 5), 0, expect=512)
    if kind == "unknown type 250":
        return _patched(raw, "<I", _part_at(tensors[0], 4), 250, expect=int(gguf.GGMLQuantizationType.F32))
    if kind == "wrong magic":
        return b"GGUX" + raw[4:]
    if kind == "version 1":
        return _patched(raw, "<I", 4, 1, expect=3)
    raise AssertionError(kind)


DAMAGE = ["truncated in tensor data", "truncated in metadata", "truncated in tensor table", "offset past the end",
          "overlapping tensors", "unknown type 250", "wrong magic", "version 1"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_file_is_refused_naming_it(cli, tmp_path, good, kind):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_damaged(kind, *good))
    out = tmp_path / "out"
    out.mkdir()
    for args in (("inspect", bad), ("convert", bad, out / "bad.safetensors")):
        message = refused(cli, *args)
        assert str(bad) in message, message
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "out"]


def test_damaged_file_messages_say_what_is_wrong(cli, tmp_path, good):
    said = {}
    for kind in ("overlapping tensors", "unknown type 250", "wrong magic", "version 1", "truncated in metadata"):
        bad = tmp_path / f"{kind.replace(' ', '-')}.gguf"
        bad.write_bytes(_damaged(kind, *good))
        said[kind] = refused(cli, "inspect", bad)
    assert "token_embd.weight overlaps position_embd.weight" in said["overlapping tensors"]
    assert "tensor token_embd.weight has the unknown GGML type id 250" in said["unknown type 250"]
    assert "magic" in said["wrong magic"] and "version 1" in said["version 1"]
    assert "truncated" in said["truncated in metadata"]


@pytest.mark.parametrize("kind", ["truncated in tensor data", "offset past the end"])
def test_data_past_the_end_is_called_truncated_naming_the_tensor(cli, tmp_path, good, kind):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_damaged(kind, *good))
    message = refused(cli, "inspect", bad)
    name = "token_embd.weight" if kind.startswith("truncated") else "output_norm.weight"
    assert name in message and "past the end" in message


def test_metadata_string_not_utf8_is_refused(cli, tmp_path, good):
    raw = good[0]
    key_len = struct.unpack_from("<Q", raw, 24)[0]  # the first key-value pair: general.architecture
    value = 24 + 8 + key_len + 4 + 8  # after the key, the value type (u32) and the string length (u64)
    assert raw[value:value + 4] == b"gpt2"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(raw[:value] + b"\xff\xfe" + raw[value + 2:])
    out = tmp_path / "out"
    out.mkdir()
    for args in (("inspect", bad), ("convert", bad, out / "bad.safetensors")):
        assert str(bad) in refused(cli, *args)
    assert list(out.iterdir()) == []
