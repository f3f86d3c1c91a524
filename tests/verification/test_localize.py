"""verify --localize: the first node (ONNX vs ONNX) or decoder layer (PyTorch vs either) where two models part.

Every candidate is a copy of a tiny seeded model with one weight changed at a known place, and the
test asserts that exactly that place is named; unchanged copies must name nothing. The feeds are
what verify gives: a prefill with a left-padded row, and a decode step on the reference's own cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from llmconv.errors import Unsupported, UsageError
from llmconv.verification.localize import _judge, localize
from llmconv.verification.profiles import outputs_profile
from llmconv.verification.runners import describe
from tests.export._exports import edit_initializers

FP32 = outputs_profile("fp32")
INT8 = outputs_profile("int8")


def _nodes(folder: Path) -> list:
    import onnx

    return list(onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


def _matmul(folder: Path, scope: str, op: str = "MatMul"):
    """The node of type ``op`` whose name holds ``scope`` (``layers.1/mlp/down_proj``)."""
    return next(n for n in _nodes(folder) if scope in n.name and n.op_type == op)


def _scaled(src: Path, dst: Path, scope: str, factor: float, op: str = "MatMul") -> Path:
    """A copy of the ONNX folder ``src`` with the weight of the node in ``scope`` multiplied by ``factor``."""
    weight = _matmul(src, scope, op).input[1]

    def edit(arrays: dict) -> None:
        arrays[weight] = (arrays[weight] * factor).astype(arrays[weight].dtype)

    return edit_initializers(src, dst, edit)


def _feeds(graph: Path, *, batch: int = 2, seq: int = 8) -> tuple[list, list]:
    """A prefill whose second row is left-padded, and one decode step on the graph's own prefill cache."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[1, :3] = 0
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    sig = describe(graph)
    prefill = {"input_ids": rng.integers(3, 1000, (batch, seq)).astype(np.int64), "attention_mask": mask,
               "position_ids": positions}
    for k, v in sig.past.names:
        prefill[k] = prefill[v] = np.zeros((batch, sig.past.num_heads, 0, sig.past.head_dim), dtype=np.float32)
    session = ort.InferenceSession(str(sig.model_path), providers=["CPUExecutionProvider"])
    present = dict(zip([o.name for o in session.get_outputs()], session.run(None, prefill), strict=True))
    del session
    full = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    step = {"input_ids": rng.integers(3, 1000, (batch, 1)).astype(np.int64), "attention_mask": full,
            "position_ids": full.sum(axis=1, keepdims=True) - 1}
    for i, (k, v) in enumerate(sig.past.names):
        step[k], step[v] = present[f"present.{i}.key"], present[f"present.{i}.value"]
    assert step[sig.past.names[0][0]].shape[2] == seq  # a non-empty past
    return [("prefill", prefill), ("decode step 1", step)], [mask, None]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("localize")


@pytest.fixture(scope="module")
def llama(fx, exported):
    return fx("llama-hf"), exported("llama-hf")[0]


@pytest.fixture(scope="module")
def llama_feeds(llama):
    return _feeds(llama[1])


@pytest.fixture(scope="module")
def scaled_layer(llama, work):
    """``scaled_layer(i)``: the Llama graph with layer i's MLP down-projection weight x3 (made once)."""
    made: dict[int, Path] = {}

    def get(layer: int) -> Path:
        if layer not in made:
            made[layer] = _scaled(llama[1], work / f"llama-down{layer}x3", f"layers.{layer}/mlp/down_proj", 3.0)
        return made[layer]

    return get


@pytest.fixture(scope="module")
def int8(llama, work):
    """The Llama graph quantized to int8 (dynamic, per channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "llama-int8"
    shutil.copytree(llama[1], out)
    quantize_dynamic(str(llama[1] / "model.onnx"), str(out / "model.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True)
    return out


# --- ONNX vs ONNX ------------------------------------------------------------------------------------------


def test_onnx_names_the_scaled_matmul(llama, llama_feeds, scaled_layer):
    feeds, valid = llama_feeds
    cand = scaled_layer(1)
    node = _matmul(cand, "layers.1/mlp/down_proj")
    out = localize(describe(llama[1]), describe(cand), feeds, profile=FP32, valid=valid)
    first = out["first"]
    assert out["method"] == "shared tensors" and out["feed"] == "prefill" and out["feeds_tried"] == 1
    assert (first["node"], first["op_type"], first["tensor"]) == (node.name, "MatMul", node.output[0])
    assert first["position"] == [n.name for n in _nodes(cand)].index(node.name)
    assert first["layer"] == 1
    # Everything the graph computed before it was compared and agreed.
    assert out["compared"] > 100 and out["skipped"] == 0
    assert first["figures"]["max_abs"] > 1e-3 and "beyond atol" in first["reason"]
    assert f"'{node.output[0]}', output of MatMul node '{node.name}'" in out["summary"]


def test_onnx_unchanged_copy_names_nothing(llama, llama_feeds, work):
    feeds, valid = llama_feeds
    copy = work / "llama-copy"
    if not copy.exists():
        shutil.copytree(llama[1], copy)
    out = localize(describe(llama[1]), describe(copy), feeds, profile=FP32, valid=valid)
    assert out["first"] is None and out["feed"] is None and out["feeds_tried"] == 2
    assert out["compared"] > 100
    assert out["summary"].startswith(f"nothing compared left the fp32 profile: {out['compared']} shared tensors "
                                     "agree on 2 feeds")


def test_onnx_external_data_is_linked_not_loaded(llama, llama_feeds, work, scaled_layer):
    """A graph whose weights live in a data file beside it: the marked copy reaches them through a link."""
    import onnx

    feeds, valid = llama_feeds
    ext = work / "llama-external"
    (ext / "weights").mkdir(parents=True)
    shutil.copy2(scaled_layer(0) / "config.json", ext / "config.json")
    model = onnx.load(str(scaled_layer(0) / "model.onnx"))
    onnx.save(model, str(ext / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights/model.onnx.data", size_threshold=0)
    assert (ext / "weights" / "model.onnx.data").is_file()
    out = localize(describe(llama[1]), describe(ext), feeds[:1], profile=FP32, valid=valid[:1])
    assert out["first"]["node"] == _matmul(ext, "layers.0/mlp/down_proj").name


def test_int8_copy_names_the_negated_matmulinteger(llama, llama_feeds, int8, work):
    feeds, valid = llama_feeds
    quant = _matmul(int8, "layers.1/mlp/down_proj", "MatMulInteger")
    cand = work / "llama-int8-negated"

    def negate(arrays: dict) -> None:
        arrays[quant.input[1]] = -arrays[quant.input[1]]

    edit_initializers(int8, cand, negate)
    original = _matmul(llama[1], "layers.1/mlp/down_proj").output[0]
    out = localize(describe(llama[1]), describe(cand), feeds, profile=INT8, valid=valid)
    first = out["first"]
    # The fp32 MatMul's output name survives as the output of the quantized path's last node (a Mul by scales).
    assert first["tensor"] == original and first["node"] != quant.name
    assert first["figures"]["cosine"] < 0 and "cosine" in first["reason"] and out["feed"] == "prefill"
    # Quantization noise alone stays within the int8 profile at every shared tensor.
    clean = localize(describe(llama[1]), describe(int8), feeds, profile=INT8, valid=valid)
    assert clean["first"] is None and clean["compared"] > 100


# --- PyTorch vs ONNX -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1])
def test_hf_vs_onnx_names_the_layer(llama, llama_feeds, scaled_layer, layer):
    feeds, valid = llama_feeds
    cand = scaled_layer(layer)
    out = localize(describe(llama[0]), describe(cand), feeds, profile=FP32, valid=valid)
    first = out["first"]
    assert out["method"] == "decoder layers" and out["feed"] == "prefill"
    assert first["layer"] == layer and first["hidden_state"] == f"hidden_states[{layer + 1}]"
    if layer == 0:
        # The residual stream leaving layer 0 for layer 1.
        assert first["where"] == "layer 0" and "layers.0/" in first["node"]
        assert out["compared"] == 2  # the embeddings agreed first
    else:
        # The last layer is compared after the final norm: the head MatMul's input.
        head = next(n for n in _nodes(cand) if "logits" in n.output)
        assert first["where"] == "layer 1 (with the final norm)" and first["tensor"] == head.input[0]
    assert out["summary"].startswith(f"on feed 'prefill', {first['where']} is the first place to leave the fp32 "
                                     f"profile (graph tensor '{first['tensor']}'")


def test_onnx_reference_vs_hf_candidate(llama, llama_feeds, scaled_layer):
    feeds, valid = llama_feeds
    out = localize(describe(scaled_layer(0)), describe(llama[0]), feeds, profile=FP32, valid=valid)
    assert out["first"]["where"] == "layer 0" and out["first"]["hidden_state"] == "hidden_states[1]"


def test_hf_vs_onnx_untouched_agrees_on_prefill_and_cached_decode(llama, llama_feeds):
    feeds, valid = llama_feeds
    out = localize(describe(llama[0]), describe(llama[1]), feeds, profile=FP32, valid=valid)
    assert out["first"] is None and out["feeds_tried"] == 2
    assert out["compared"] == 4  # embeddings, layer 0, layer 1 after the final norm, logits


def test_hf_vs_onnx_on_the_decode_step_alone(llama, llama_feeds, scaled_layer):
    """The decode feed carries the prefill's cache: the PyTorch side gets it as a DynamicCache."""
    feeds, valid = llama_feeds
    out = localize(describe(llama[0]), describe(scaled_layer(0)), feeds[1:], profile=FP32, valid=valid[1:])
    assert out["feed"] == "decode step 1" and out["first"]["where"] == "layer 0"
    assert out["first"]["figures"]["shape"] == [2, 1, 64]


def test_gpt2_layer_scopes(fx, exported, work):
    hf, graph = fx("gpt2-hf"), exported("gpt2-hf")[0]
    feeds, valid = _feeds(graph)
    cand = _scaled(graph, work / "gpt2-h0", "h.0/mlp/c_proj", 3.0, op="Gemm")
    out = localize(describe(hf), describe(cand), feeds, profile=FP32, valid=valid)
    assert out["first"]["where"] == "layer 0" and out["first"]["node"].startswith("/transformer/h.0/")
    assert localize(describe(hf), describe(graph), feeds, profile=FP32, valid=valid)["first"] is None


# --- PyTorch vs PyTorch ----------------------------------------------------------------------------------------


def test_hf_vs_hf_names_the_layer_then_the_head(fx, llama_feeds):
    feeds, valid = llama_feeds
    ref = describe(fx("llama-hf"))
    swapped = localize(ref, describe(fx("llama-hf-swapped-rows")), feeds, profile=FP32, valid=valid)
    assert swapped["first"]["where"] == "layer 0" and swapped["first"]["tensor"] == "hidden_states[1]"
    # One element of lm_head changed: every layer agrees, the logits do not.
    head = localize(ref, describe(fx("llama-hf-perturbed")), feeds, profile=FP32, valid=valid)
    assert head["first"]["where"] == "the head" and head["first"]["tensor"] == "logits"
    assert head["compared"] == 4 and "every decoder layer compared agrees" in head["summary"]


# --- what cannot be localized --------------------------------------------------------------------------------


def _tiny_graph(path: Path, out_name: str, *, ids: bool = False) -> Path:
    """A one-node graph (Relu, or a Cast of input_ids to float) whose output is ``out_name``."""
    import onnx
    from onnx import TensorProto, helper

    if ids:
        node = helper.make_node("Cast", ["input_ids"], [out_name], to=TensorProto.FLOAT, name="/cast")
        inp = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    else:
        node = helper.make_node("Relu", ["x"], [out_name], name="/relu")
        inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    graph = helper.make_graph([node], "g", [inp], [helper.make_empty_tensor_value_info(out_name)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_graphs_sharing_no_tensor_are_refused(work):
    a, b = _tiny_graph(work / "tiny" / "a.onnx", "y1"), _tiny_graph(work / "tiny" / "b.onnx", "y2")
    with pytest.raises(Unsupported, match=r"b\.onnx: the two graphs compute no tensor under the same name"):
        localize(describe(a), describe(b), [("x", {"x": np.ones(2, dtype=np.float32)})], profile=FP32)


def test_graph_without_layer_scopes_is_refused(llama, work):
    flat = _tiny_graph(work / "flat" / "model.onnx", "logits", ids=True)
    feed = {"input_ids": np.ones((1, 4), dtype=np.int64), "attention_mask": np.ones((1, 4), dtype=np.int64)}
    with pytest.raises(Unsupported, match=r"model\.onnx: the graph's node names carry no decoder-layer scope"):
        localize(describe(llama[0]), describe(flat), [("x", feed)], profile=FP32)


def test_feeds_and_masks_must_match(llama):
    sig = describe(llama[1])
    with pytest.raises(UsageError, match="at least one input"):
        localize(sig, sig, [], profile=FP32)
    with pytest.raises(UsageError, match="valid holds 2 masks for 1 feeds"):
        localize(sig, sig, [("x", {})], profile=FP32, valid=[None, None])


def test_padding_and_shared_nan_are_not_differences():
    ref = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    cand = ref.copy()
    cand[1, 0] += 5.0  # a padded position
    mask = np.array([[True, True, True], [False, True, True]])
    assert _judge("h", ref, cand, mask, FP32).passed
    assert not _judge("h", ref, cand, None, FP32).passed
    ref[0, 0, 0] = cand[0, 0, 0] = np.nan  # a fully masked softmax row gives NaN on both sides
    assert _judge("h", ref, cand, mask, FP32).passed
    cand[0, 0, 1] = np.nan
    assert "NaN in the candidate" in _judge("h", ref, cand, mask, FP32).reason
