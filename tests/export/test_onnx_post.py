"""After the exporter: IR version lowered to what onnxruntime loads, external data gathered in one file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmconv.export.onnx_post import finalize, ort_max_ir_version, rename_model


def _model(ir_version: int, opset: int = 18):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version), w1, w2


def _run(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": np.ones((2, 8), np.float32)})[0]


def test_ir_version_above_onnxruntime_is_lowered(tmp_path):
    top = ort_max_ir_version()
    if top >= onnx.IR_VERSION:
        pytest.skip(f"onnxruntime loads the newest IR version onnx writes ({top})")
    model, w1, w2 = _model(onnx.IR_VERSION)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    with pytest.raises(Exception, match="(?i)ir version|unsupported model"):
        _run(path)
    info = finalize(path, data_name="model.onnx_data", external_data=False)
    assert info["ir_lowered_from"] == onnx.IR_VERSION and info["ir_version"] == top
    assert onnx.load(str(path)).ir_version == top
    np.testing.assert_allclose(_run(path), np.ones((2, 8), np.float32) @ w1 @ w2, rtol=1e-5)


def test_weights_spread_over_files_are_gathered_in_one(tmp_path):
    model, w1, w2 = _model(10)
    path = tmp_path / "model.onnx"
    # As torch.onnx writes models over 2 GB: one external file per tensor.
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(tmp_path.iterdir())) == 3
    info = finalize(path, data_name="model.onnx_data", external_data=False)
    assert info["external_data"] == ["model.onnx_data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert info["initializers"] == 2 and info["parameters"] == 8 * 64 + 64 * 4
    loaded = onnx.load(str(path))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), w1)
    np.testing.assert_allclose(_run(path), np.ones((2, 8), np.float32) @ w1 @ w2, rtol=1e-5)


def test_external_data_on_request_and_rename(tmp_path):
    model, w1, w2 = _model(10)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    info = finalize(path, data_name="model.onnx_data", external_data=True)
    assert info["external_data"] == ["model.onnx_data"] and info["ir_lowered_from"] is None
    moved = rename_model(path, "tiny.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.onnx_data"]
    refs = {e.value for t in onnx.load(str(moved), load_external_data=False).graph.initializer
            for e in t.external_data if e.key == "location"}
    assert refs == {"tiny.onnx_data"}
    np.testing.assert_allclose(_run(moved), np.ones((2, 8), np.float32) @ w1 @ w2, rtol=1e-5)
