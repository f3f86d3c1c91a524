"""ONNX as a source of named tensors: every initializer bit-exact, external data checked, details for inspect."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from llmconv.errors import CorruptInput, InputError, UnsafeInput
from llmconv.formats import registry
from llmconv.formats.onnx import open_model
from tests.export import _exports


@pytest.fixture(scope="module")
def gpt2_onnx(fixtures_dir, fx):
    return _exports.export(fixtures_dir, fx, "gpt2-hf")[0]


def _reference_arrays(path):
    model = onnx.load(str(path), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_detected_by_content_and_by_folder(gpt2_onnx, tmp_path):
    assert registry.detect(gpt2_onnx / "model.onnx").name == "onnx"
    assert registry.detect(gpt2_onnx).name == "onnx"  # a folder holding model.onnx
    renamed = tmp_path / "weights.blob"  # no known extension: the protobuf header says ONNX
    shutil.copyfile(gpt2_onnx / "model.onnx", renamed)
    assert registry.detect(renamed).name == "onnx"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07\x12\xff\xff\xff\xff\xff not a model")
    with pytest.raises(CorruptInput, match="not a valid ONNX protobuf"):
        registry.open_checkpoint(junk)


def test_initializers_are_bit_exact_named_tensors(gpt2_onnx):
    expected = _reference_arrays(gpt2_onnx / "model.onnx")
    with open_model(gpt2_onnx / "model.onnx") as src:
        assert src.names() == list(expected)
        assert "transformer.wte.weight" in src.infos
        for name, arr in expected.items():
            t = src.tensor(name)
            assert tuple(t.shape) == arr.shape and str(t.dtype) == f"torch.{arr.dtype}"
            assert t.numpy().tobytes() == arr.tobytes(), name
        assert src.weights_format == "onnx" and src.format == "onnx"


def test_details_for_inspect(gpt2_onnx):
    with open_model(gpt2_onnx / "model.onnx") as src:
        d = src.details
    assert d["opset"] == 18 and isinstance(d["ir_version"], int) and d["producer"].startswith("pytorch")
    ids = d["inputs"][0]
    assert ids == {"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]}
    past = next(i for i in d["inputs"] if i["name"] == "past_key_values.0.key")
    assert past["shape"] == ["batch_size", 2, "past_sequence_length", 32]
    assert [o["name"] for o in d["outputs"]][:2] == ["logits", "present.0.key"]
    assert d["ops"]["MatMul"] > 0 and list(d["ops"].values()) == sorted(d["ops"].values(), reverse=True)
    assert d["nodes"] == sum(d["ops"].values())
    assert d["initializers"] == 15 and d["initializer_bytes"] == sum(a.nbytes for a in
                                                                      _reference_arrays(gpt2_onnx / "model.onnx")
                                                                      .values())
    assert d["external_data"] == []


def test_inspect_json_on_onnx(gpt2_onnx, cli):
    import json

    r = cli("inspect", gpt2_onnx / "model.onnx", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    for key in ("opset", "ir_version", "producer", "ops", "inputs", "outputs", "initializers", "initializer_bytes"):
        assert key in info, key
    assert info["format"] == "onnx" and info["tensors"] == 15 and info["architecture"] == "GPT2LMHeadModel"
    r = cli("inspect", gpt2_onnx / "model.onnx")
    assert r.exit_code == 0
    for text in ("opset", "ir_version", "producer", "past_key_values.0.key", "MatMul x"):
        assert text in r.stdout, text


def test_external_data_is_read_bit_exact(fx):
    folder = fx("onnx-external-data")
    with open_model(folder / "model.onnx") as src:
        expected = _reference_arrays(folder / "model.onnx")
        assert src.names() == ["W", "B"]
        for n in src.names():
            assert src.tensor(n).numpy().tobytes() == expected[n].tobytes()
        assert src.details["external_data"] == ["weights.bin"]
        assert [f.name for f in src.files] == ["model.onnx", "weights.bin"]


@pytest.mark.parametrize(("name", "error", "text"), [
    ("onnx-external-escape", UnsafeInput, "external data file path '../escape-target.dat' leaves the model's folder"),
    ("onnx-external-absolute", UnsafeInput, "external data file path '/etc/hostname' is absolute"),
    ("onnx-external-truncated", CorruptInput, "initializer 'W' reads bytes 0..48 of 'weights.bin', which holds 20"),
])
def test_unsafe_or_broken_external_data_is_refused(fx, name, error, text):
    with pytest.raises(error) as e:
        open_model(fx(name))
    assert text in str(e.value)
    assert e.value.exit_code == 2


def test_missing_external_data_file(fx, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(fx("onnx-external-data"), folder)
    (folder / "weights.bin").unlink()
    with pytest.raises(InputError, match="external data file 'weights.bin' is missing"):
        open_model(folder / "model.onnx")


def test_escape_through_a_symlink_is_refused(fx, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(fx("onnx-external-data"), folder)
    outside = tmp_path / "outside.bin"
    (folder / "weights.bin").rename(outside)
    (folder / "weights.bin").symlink_to(outside)
    with pytest.raises(UnsafeInput, match="resolves outside the model's folder"):
        open_model(folder)


def _typed_model(tmp_path):
    """Initializers stored in the typed fields (not raw_data), and a packed int4 tensor."""
    f16 = np.array([1.5, -2.25, 65504.0, np.float16(1e-7)], dtype=np.float16)
    t_f16 = TensorProto(name="f16", data_type=TensorProto.FLOAT16, dims=[4])
    t_f16.int32_data.extend(f16.view(np.uint16).astype(np.int32).tolist())  # bit patterns, as the spec says
    t_f32 = helper.make_tensor("f32", TensorProto.FLOAT, [2, 2], [1.0, -0.0, 3.5, float("inf")])
    t_i64 = helper.make_tensor("i64", TensorProto.INT64, [3], [1, -2, 2**40])
    t_i8 = helper.make_tensor("i8", TensorProto.INT8, [3], [-128, 0, 127])
    t_bool = helper.make_tensor("flag", TensorProto.BOOL, [2], [True, False])
    t_i4 = helper.make_tensor("i4", TensorProto.INT4, [5], [1, -2, 3, -8, 7])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [t_f16, t_f32, t_i64, t_i8, t_bool, t_i4])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path = tmp_path / "typed.onnx"
    onnx.save(model, str(path))
    return path, f16


def test_typed_fields_and_packed_int4(tmp_path):
    path, f16 = _typed_model(tmp_path)
    with open_model(path) as src:
        assert src.tensor("f16").numpy().tobytes() == f16.tobytes()
        assert src.tensor("f32").dtype == torch.float32
        assert src.tensor("f32").numpy().tobytes() == np.array([[1.0, -0.0], [3.5, np.inf]], np.float32).tobytes()
        assert src.tensor("i64").tolist() == [1, -2, 2**40]
        assert src.tensor("i8").tolist() == [-128, 0, 127]
        assert src.tensor("flag").tolist() == [True, False]
        # int4 has no torch dtype: its packed bytes, with the real type and shape in details.
        assert src.infos["i4"].dtype == torch.uint8 and src.infos["i4"].shape == (3,)
        assert src.details["packed"] == {"i4": {"dtype": "int4", "shape": [5]}}
        packed = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[5])
        assert packed.tolist() == [1, -2, 3, -8, 7]  # what onnx itself reads back
        low = src.tensor("i4").numpy() & 0x0F
        assert low[0] == 1  # first element in the low nibble, as the spec packs it


def test_weights_out_of_onnx_round_trip(gpt2_onnx, fx, tmp_path, cli):
    # llmconv's export carries a name record: the checkpoint's names come back (tests/export/test_name_record.py);
    # a graph without one (the external-data fixture) keeps its initializer names.
    with registry.open_checkpoint(fx("gpt2-hf")) as checkpoint:
        restored = {n: checkpoint.tensor(n).numpy().copy() for n in checkpoint.names()}
    for src in (gpt2_onnx / "model.onnx", fx("onnx-external-data") / "model.onnx"):
        expected = restored if src.parent == gpt2_onnx else _reference_arrays(src)
        for ext in (".safetensors", ".bin"):
            dst = tmp_path / f"{src.parent.name}{ext}"
            r = cli("convert", src, dst)
            assert r.exit_code == 0, r.output
            assert "verified" in r.stdout
            with registry.open_checkpoint(dst) as out:
                assert sorted(out.names()) == sorted(expected)
                for n, arr in expected.items():
                    assert out.tensor(n).numpy().tobytes() == arr.tobytes(), n


def test_convert_refuses_escaping_external_data(fx, tmp_path, cli):
    r = cli("convert", fx("onnx-external-escape") / "model.onnx", tmp_path / "x.safetensors")
    assert r.exit_code == 2
    assert "leaves the model's folder" in r.stderr and "refusing to read outside the model" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()
    r = cli("inspect", fx("onnx-external-absolute"))
    assert r.exit_code == 2 and "is absolute" in r.stderr
