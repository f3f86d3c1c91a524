"""safetensors format: reading (validated, mapped), writing (streamed, library layout), sharded folders."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmconv.errors import CorruptInput, InputError, UnsafeInput, UsageError
from llmconv.formats import registry, sharding
from llmconv.formats import safetensors as st_format
from llmconv.formats.registry import WriteOptions
from tests.formats._maps import mapped_file


def st_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def test_open_reads_names_dtypes_shapes_and_metadata(fx):
    path = fx("llama.safetensors")
    with safe_open(str(path), framework="pt") as ref, registry.open_checkpoint(path) as src:
        assert src.format == "safetensors" and src.weights_format == "safetensors"
        assert set(src.names()) == set(ref.keys())
        assert src.metadata == {"format": "pt", "source": "llmconv-fixture"}
        for name in ref.keys():  # noqa: SIM118 - safe_open has keys() but is not iterable
            expected = ref.get_tensor(name)
            assert src.infos[name].dtype == expected.dtype
            assert src.infos[name].shape == tuple(expected.shape)
            assert torch.equal(src.tensor(name), expected)
        assert src.num_parameters == 205_120 and src.total_bytes == 205_120 * 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_open_is_lazy_tensors_are_views_of_the_mapped_file(fx):
    path = fx("llama.safetensors")
    with registry.open_checkpoint(path) as src:
        assert src.zero_copy
        for name in ("lm_head.weight", "model.norm.weight"):
            t = src.tensor(name)
            assert mapped_file(t.data_ptr()) == str(path.resolve())


def test_mixed_dtypes_read_bit_for_bit(fx):
    path = fx("mixed-dtypes.safetensors")
    ref = load_file(path)
    with registry.open_checkpoint(path) as src:
        assert {n: str(i.dtype) for n, i in src.infos.items()} == {n: str(t.dtype) for n, t in ref.items()}
        assert src.infos["empty"].shape == (0, 4) and src.tensor("empty").shape == (0, 4)
        assert src.infos["scalar"].shape == () and src.tensor("scalar").item() == 3.5
        specials = src.tensor("specials")
        assert specials.view(torch.int32).tolist() == ref["specials"].view(torch.int32).tolist()
        assert torch.signbit(specials[3]) and specials[3] == 0  # -0.0 kept


def test_written_file_is_byte_identical_to_the_library_writer(fx, tmp_path):
    """Our streamed writer follows save_file's layout: alignment order, then name; header padded to 8."""
    tensors = load_file(fx("mixed-dtypes.safetensors"))
    ref_path, our_path = tmp_path / "ref.safetensors", tmp_path / "ours.safetensors"
    save_file(tensors, ref_path, metadata={"format": "pt"})
    with registry.open_checkpoint(fx("mixed-dtypes.safetensors")) as src:
        st_format.write_file(src, src.names(), our_path, metadata={"format": "pt"})
    assert our_path.read_bytes() == ref_path.read_bytes()


def test_every_dtype_is_laid_out_as_the_library_does(tmp_path):
    from llmconv.checkpoint import TensorInfo, TensorSource

    tensors = {f"t_{name}": _sample(dtype) for dtype, name in st_format.ST_NAMES.items()}
    ref_path, our_path = tmp_path / "ref.safetensors", tmp_path / "ours.safetensors"
    save_file(tensors, ref_path)
    src = TensorSource(format="test", path=tmp_path, loader=lambda n: tensors[n],
                       infos={n: TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()})
    st_format.write_file(src, sorted(tensors), our_path, metadata={})
    assert our_path.read_bytes() == ref_path.read_bytes()


def _sample(dtype: torch.dtype) -> torch.Tensor:
    """A small tensor of ``dtype`` with varied bytes (1-byte dtypes, float8 scales and packed float4 included)."""
    if dtype == torch.bool:
        return torch.tensor([[True, False, True, True]])
    size = torch.empty(0, dtype=dtype).element_size()
    raw = (torch.arange(2 * 4 * size) * 37 % 120).to(torch.uint8)
    return raw.view(dtype).view(2, -1) if size == 1 else raw.view(dtype).view(2, -1).clone()


def test_every_dtype_the_safetensors_library_handles_is_read_and_written_back_unchanged(tmp_path, cli):
    """F8_E8M0 scales, the FNUZ float8s and packed F4 (header shape counts 4-bit values) included: a file the
    library reads, llmconv reads, and writes back byte for byte."""
    from safetensors import safe_open
    from safetensors.torch import _SIZE

    assert {torch.float8_e8m0fnu, torch.float4_e2m1fn_x2} <= set(_SIZE)
    assert set(st_format.ST_NAMES) == set(_SIZE)
    tensors = {f"t_{str(dt).removeprefix('torch.')}": _sample(dt) for dt in _SIZE}
    path, back = tmp_path / "all.safetensors", tmp_path / "back.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    with registry.open_checkpoint(path) as src, safe_open(str(path), framework="pt") as lib:
        for name in tensors:
            ours, theirs = src.tensor(name), lib.get_tensor(name)
            assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape), name
            assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)), name
    r = cli("convert", path, back)
    assert r.exit_code == 0, r.output
    assert back.read_bytes() == path.read_bytes()
    assert cli("inspect", path).exit_code == 0


def test_write_file_streams_non_contiguous_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    tensors = {"t": base.t(), "slice": base[:, 1:3]}
    from llmconv.checkpoint import TensorInfo, TensorSource

    src = TensorSource(format="test", path=tmp_path, loader=lambda n: tensors[n],
                       infos={n: TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()})
    st_format.write_file(src, ["t", "slice"], tmp_path / "o.safetensors", metadata={})
    out = load_file(tmp_path / "o.safetensors")
    assert torch.equal(out["t"], base.t()) and torch.equal(out["slice"], base[:, 1:3])


def test_sharded_folder_written_in_transformers_layout(fx, tmp_path):
    dst = tmp_path / "sharded"
    dst.mkdir()
    with registry.open_checkpoint(fx("llama.safetensors")) as src:
        files = st_format.FORMAT.write(src, dst, folder=True, options=WriteOptions(shard_size=100_000))
        expected = {n: src.tensor(n).clone() for n in src.names()}
    index = json.loads((dst / sharding.SAFETENSORS_INDEX).read_text())
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(shards) == 6 and shards[0] == "model-00001-of-00006.safetensors"
    assert sorted(p.name for p in files) == sorted([*shards, sharding.SAFETENSORS_INDEX])
    assert index["metadata"]["total_size"] == 205_120 * 4
    assert set(index["weight_map"]) == set(expected) and set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        with safe_open(str(dst / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "source": "llmconv-fixture"}
            names = list(f.keys())
            assert all(index["weight_map"][n] == shard for n in names)
            # A shard holds at most 100 KB of data, unless one tensor alone is larger.
            size = sum(expected[n].nbytes for n in names)
            assert size <= 100_000 or len(names) == 1
    assert registry.detect(dst).name == "safetensors"
    with registry.open_checkpoint(dst) as back:
        assert back.details["shards"] == 6
        for n, t in expected.items():
            assert torch.equal(back.tensor(n), t)


def test_single_file_with_shard_size_smaller_than_model_is_refused(fx, tmp_path):
    with registry.open_checkpoint(fx("llama.safetensors")) as src, pytest.raises(UsageError, match="folder"):
        st_format.FORMAT.write(src, tmp_path / "x.safetensors", folder=False, options=WriteOptions(shard_size=1000))


def test_dtype_safetensors_cannot_hold_is_refused_by_name(tmp_path):
    from llmconv.checkpoint import TensorInfo, TensorSource

    t = torch.zeros(2, dtype=torch.complex128)
    src = TensorSource(format="test", path=tmp_path, loader=lambda n: t,
                       infos={"c": TensorInfo("c", t.dtype, (2,))})
    with pytest.raises(UsageError, match="tensor 'c' has dtype complex128"):
        st_format.write_file(src, ["c"], tmp_path / "o.safetensors", metadata={})


def test_detection_by_content_before_extension(fx, tmp_path):
    disguised = tmp_path / "weights.bin"
    shutil.copyfile(fx("llama.safetensors"), disguised)
    assert registry.detect(disguised).name == "safetensors"
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copyfile(fx("llama.safetensors"), folder / "w.safetensors")
    assert registry.detect(folder).name == "safetensors"
    with registry.open_checkpoint(folder) as src:
        assert len(src.infos) == 21


@pytest.mark.parametrize(("fixture", "words"), [
    ("bad-header-length.safetensors", "header length 10000000 runs past the end of the 80-byte file"),
    ("bad-json.safetensors", "header is not valid JSON"),
    ("overlap.safetensors", "tensor 'b' overlaps the tensor before it"),
    ("unknown-dtype.safetensors", "tensor 'w' has unknown dtype 'F12'"),
    ("truncated-data.safetensors", "tensor 'w' runs past the end of the file (truncated?)"),
])
def test_corrupt_files_raise_corrupt_input_naming_file_and_problem(fx, fixture, words):
    path = fx(fixture)
    with pytest.raises(CorruptInput) as info:
        registry.open_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ")
    assert words in str(info.value)


@pytest.mark.parametrize(("header", "data", "words"), [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16, "gap of 8 bytes before tensor 'a'"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed shape"),
    ({"a": [1, 2]}, b"", "is not an object"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__ must map strings to strings"),
])
def test_lying_headers_are_refused(tmp_path, header, data, words):
    path = tmp_path / "lie.safetensors"
    path.write_bytes(st_bytes(header, data))
    with pytest.raises(CorruptInput, match=words.replace("(", r"\(").replace(")", r"\)")):
        registry.open_checkpoint(path)


def test_header_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.safetensors"
    raw = b"[1, 2, 3]".ljust(16)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CorruptInput):
        registry.open_checkpoint(path)


def test_short_and_empty_files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CorruptInput, match="shorter than a safetensors header"):
        registry.open_checkpoint(empty)


def test_index_problems(fx):
    with pytest.raises(CorruptInput, match="index names shard 'model-00002-of-00002.safetensors', which is missing"):
        registry.open_checkpoint(fx("index-missing-shard"))
    with pytest.raises(UnsafeInput, match=r"shard path '\.\./outside\.safetensors' leaves the model's folder"):
        registry.open_checkpoint(fx("index-dotdot-shard"))
    with pytest.raises(UnsafeInput, match="shard path '/etc/passwd' is absolute"):
        registry.open_checkpoint(fx("index-absolute-shard"))


def test_index_naming_a_tensor_its_shard_lacks(fx_copy):
    folder = fx_copy("index-missing-shard")
    index = folder / sharding.SAFETENSORS_INDEX
    data = json.loads(index.read_text())
    data["weight_map"]["b"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CorruptInput, match="index maps tensor 'b' to shard 'model-00001-of-00002.safetensors', "
                                           "which does not hold it"):
        registry.open_checkpoint(folder)
    index.write_text(json.dumps({"weight_map": {"a": 3}}))
    with pytest.raises(CorruptInput, match="no valid 'weight_map'"):
        registry.open_checkpoint(folder)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        registry.detect(tmp_path / "nope.safetensors")


def test_files_we_write_are_readable_by_others(fx, tmp_path):
    from llmconv.conversion import convert

    dst = tmp_path / "o.safetensors"
    convert(fx("llama.safetensors"), dst)
    assert oct(os.stat(dst).st_mode & 0o777) == "0o644"
