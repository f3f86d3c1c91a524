"""Synthetic calibration feeds come from the verifier's input generator: images for vision graphs (ViT,
ResNet), normalised as their preprocessor_config.json says, token ids for language models; and
int8-static on the vision exports is written, verified, and holds QDQ nodes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from llmconv.errors import UsageError
from llmconv.transforms.calibration import calibration_batches
from llmconv.verification.inputs import plan_for, synthetic_inputs
from llmconv.verification.runners import describe
from tests._lossy import quantize_checked
from tests.export._exports import export
from tests.transforms._models import leftovers


@pytest.fixture(scope="session")
def vision(fixtures_dir, fx):
    """``vision(name)`` -> the verified ONNX export (folder) of hf fixture ``name``."""
    return lambda name: export(fixtures_dir, fx, name)[0]


def _calibrate(folder: Path, **kwargs):
    mfile = folder / "model.onnx"
    config = json.loads((folder / "config.json").read_text())
    return calibration_batches(onnx.load(str(mfile), load_external_data=False), mfile, None, config=config, **kwargs)


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize(("name", "mean", "std"), [("vit-hf", [0.5] * 3, [0.5] * 3),
                                                   ("resnet-hf", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
def test_vision_calibration_feeds_are_images_normalised_as_the_preprocessor_says(vision, name, mean, std):
    folder = vision(name)
    feeds, described = _calibrate(folder, samples=4, seed=3)
    assert described == {"kind": "synthetic", "samples": 4, "batch": 1, "image": "3x32x32", "mean": mean, "std": std,
                         "seed": 3, "shapes": [[1, 3, 32, 32]]}
    assert [sorted(f) for f in feeds] == [["pixel_values"]] * 4
    px = np.stack([f["pixel_values"] for f in feeds])
    assert px.dtype == np.float32 and px.shape == (4, 1, 3, 32, 32)
    # Undo the image processor (x / 255 - mean) / std: whole pixel values in [0, 255], spread over the range.
    pixels = (px * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]) * 255
    assert np.abs(pixels - np.round(pixels)).max() < 1e-3
    assert round(float(pixels.min())) == 0 and round(float(pixels.max())) == 255
    # One generator: the very arrays the verifier draws for this graph at the same seed, in one shape.
    same = synthetic_inputs(plan_for(describe(folder / "model.onnx")), batch=1, seq_len=64, samples=4, seed=3,
                            edge_shapes=False)
    assert all(np.array_equal(f["pixel_values"], s["pixel_values"]) for f, s in zip(feeds, same, strict=True))


def test_token_calibration_feeds_come_from_the_same_generator(vision):
    folder = vision("gpt2-hf")
    feeds, described = _calibrate(folder, samples=3, seed=0, seq_len=16)
    assert described["kind"] == "synthetic" and described["samples"] == 3 and described["seq_len"] == 16
    assert described["shapes"] == [[1, 16], [1, 8]]  # two lengths, no 1-token edge sample
    graph_inputs = [i.name for i in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.input]
    assert all(list(f) == graph_inputs for f in feeds)
    same = synthetic_inputs(plan_for(describe(folder / "model.onnx")), batch=1, seq_len=16, samples=3, seed=0,
                            edge_shapes=False)
    assert all(np.array_equal(f[k], s[k]) for f, s in zip(feeds, same, strict=True) for k in f)


def test_int8_static_on_vit_is_verified_and_holds_qdq_nodes(vision, tmp_path):
    dst = tmp_path / "vit-int8"
    r, v = quantize_checked(vision("vit-hf"), dst, may_refuse=False, target="cpu", method="int8-static")
    assert v.passed and r.options["format"] == "QDQ" and r.options["calibration"]["image"] == "3x32x32"
    assert r.ops_quantized == {"MatMul": 12, "Gemm": 1}
    ops = _ops(dst / "model.onnx")
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0


def test_int8_static_cli_on_vit_and_resnet_exports(vision, cli, tmp_path):
    for name in ("vit-hf", "resnet-hf"):
        out = tmp_path / name
        r = cli("quantize", vision(name), out, "--method", "int8-static", "--target", "cpu")
        assert r.exit_code == 0, r.output
        assert "kind=synthetic" in r.stdout and "verified (outputs, profile int8)" in r.stdout
        ops = _ops(out / "model.onnx")
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0


def test_int8_static_with_nothing_to_quantize_exits_2_with_one_line(vision, cli, tmp_path):
    # ResNet's weights are in Conv nodes and one Gemm: with MatMul only there is nothing for int8-static.
    r = cli("quantize", vision("resnet-hf"), tmp_path / "q", "--method", "int8-static", "--target", "cpu",
            "--op-types", "MatMul")
    assert r.exit_code == 2
    assert "the graph has no MatMul node with a float32 weight to quantize" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "q").exists() and leftovers(tmp_path) == []


def _graph(folder: Path, inputs: list[tuple[str, int, list]]) -> Path:
    """A one-node graph (Identity of its first input) taking ``inputs`` (name, elem type, dims)."""
    folder.mkdir()
    vis = [helper.make_tensor_value_info(n, t, d) for n, t, d in inputs]
    out = helper.make_tensor_value_info("out", inputs[0][1], inputs[0][2])
    graph = helper.make_graph([helper.make_node("Identity", [inputs[0][0]], ["out"])], "g", vis, [out])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(("inputs", "message"), [
    ([("pixel_values", TensorProto.FLOAT, ["b", 3, 8, 8]), ("mask", TensorProto.INT64, ["b", 8])],
     "synthetic calibration images are made for models that take only pixel_values; this one also takes mask"),
    ([("features", TensorProto.FLOAT, ["b", 4])],
     "synthetic calibration inputs need a model that takes input_ids or pixel_values; this one takes features"),
])
def test_synthetic_calibration_names_what_it_cannot_make(tmp_path, inputs, message):
    path = _graph(tmp_path / "m", inputs)
    with pytest.raises(UsageError, match=message) as e:
        calibration_batches(onnx.load(str(path)), path, None, config=None)
    assert "--calibration FILE.npz" in str(e.value)
