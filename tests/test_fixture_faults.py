"""fixtures/faults.py: each seeded fault is real (the outputs change where it should) and bounded (they do not
change where it should not), checked with onnxruntime directly rather than through llmconv's verifier."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from fixtures.faults import layer_scaled, mask_ignored, matmul_perturbed, past_zeroed
from fixtures.make_fixtures import VOCAB
from tests.export._exports import export

KINDS = ("llama", "gpt2")
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@pytest.fixture(scope="module")
def onnx_dirs(fixtures_dir, fx) -> dict[str, Path]:
    """kind -> the tiny hf model exported (and verified) as an ONNX folder with past key/values."""
    return {kind: export(fixtures_dir, fx, f"{kind}-hf")[0] for kind in KINDS}


@pytest.fixture(scope="module")
def quantized(onnx_dirs, tmp_path_factory) -> dict[str, Path]:
    """The Llama graph quantized two ways, each alone in a folder: dynamic int8 and 4-bit MatMulNBits."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root = tmp_path_factory.mktemp("quantized")
    src = onnx_dirs["llama"] / "model.onnx"
    (root / "int8").mkdir()
    quantize_dynamic(src, root / "int8" / "model.onnx", weight_type=QuantType.QInt8, per_channel=True)
    q4 = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True)
    q4.process()
    (root / "int4").mkdir()
    q4.model.save_model_to_file(str(root / "int4" / "model.onnx"), False)
    return {"int8": root / "int8", "int4": root / "int4"}


# ---- helpers ------------------------------------------------------------------------------------

def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _run(folder: Path, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
         past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """All outputs of ``folder``'s graph; ``past`` None feeds an empty cache, shaped from the graph's inputs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for arg in sess.get_inputs():
        if arg.name.startswith("past_key_values."):
            heads, head_dim = arg.shape[1], arg.shape[3]
            empty = np.zeros((ids.shape[0], heads, 0, head_dim), dtype=_NP[arg.type])
            feeds[arg.name] = empty if past is None else past[arg.name]
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {a.name: feeds[a.name] for a in sess.get_inputs()}), strict=True))


def _prefill(batch: int = 2, length: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.random.default_rng(0).integers(3, VOCAB, (batch, length), dtype=np.int64)
    positions = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    return ids, np.ones_like(ids), positions


def _as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k.replace("present.", "past_key_values."): v for k, v in outputs.items() if k.startswith("present.")}


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _checked(src: Path, dst: Path):
    """dst's graph, after asserting it is valid and keeps src's IR version and opsets."""
    import onnx

    a, b = onnx.load(str(src / "model.onnx")), onnx.load(str(dst / "model.onnx"))
    onnx.checker.check_model(b)
    assert b.ir_version == a.ir_version
    assert {(o.domain, o.version) for o in b.opset_import} == {(o.domain, o.version) for o in a.opset_import}
    assert [i.name for i in b.graph.input] == [i.name for i in a.graph.input]
    return a, b


def _weights_changed(a, b) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Initializers of ``b`` that differ from ``a``'s (or are new): name -> (new array, old array or None)."""
    from onnx import numpy_helper

    old = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    changed = {}
    for t in b.graph.initializer:
        new = numpy_helper.to_array(t)
        if t.name not in old or not np.array_equal(new, old[t.name]):
            changed[t.name] = (new, old.get(t.name))
    return changed


def _node(model, name: str):
    return next(n for n in model.graph.node if n.name == name)


def _init(model, name: str):
    return next(t for t in model.graph.initializer if t.name == name)


# ---- past_zeroed and mask_ignored -------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_past_zeroed_agrees_on_an_empty_past_and_differs_on_a_real_one(kind, onnx_dirs, tmp_path):
    src = onnx_dirs[kind]
    before = _digest(src)
    dst = past_zeroed(src, tmp_path / "fault")
    assert dst == tmp_path / "fault" and _digest(src) == before
    assert {p.name for p in dst.iterdir()} == {p.name for p in src.iterdir()}
    _checked(src, dst)

    ids, mask, positions = _prefill()
    ref, got = _run(src, ids, mask, positions), _run(dst, ids, mask, positions)
    assert ref.keys() == got.keys()
    assert all(np.array_equal(ref[k], got[k]) for k in ref)  # empty past: identical, caches included

    # One decode step on the prefill's cache: the fault reads zeros where the cache is.
    step = np.array([[7], [11]], dtype=np.int64)
    mask1, pos1 = np.ones((2, ids.shape[1] + 1), dtype=np.int64), np.full((2, 1), ids.shape[1], dtype=np.int64)
    past = _as_past(ref)
    decoded, faulty = _run(src, step, mask1, pos1, past), _run(dst, step, mask1, pos1, past)
    assert _max_diff(decoded["logits"], faulty["logits"]) > 1e-3
    zeros = {k: np.zeros_like(v) for k, v in past.items()}
    np.testing.assert_allclose(faulty["logits"], _run(src, step, mask1, pos1, zeros)["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_ignored_agrees_on_all_ones_and_differs_on_a_left_padded_row(kind, onnx_dirs, tmp_path):
    src = onnx_dirs[kind]
    before = _digest(src)
    dst = mask_ignored(src, tmp_path / "fault")
    assert _digest(src) == before
    _checked(src, dst)

    ids, mask, positions = _prefill()
    ref, got = _run(src, ids, mask, positions), _run(dst, ids, mask, positions)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)

    # Row 1 left-padded by two, with positions as generate() builds them.
    mask[1, :2] = 0
    positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)
    ref, got = _run(src, ids, mask, positions)["logits"], _run(dst, ids, mask, positions)["logits"]
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-5)  # the unpadded row is untouched
    assert all(_max_diff(got[1, t], ref[1, t]) > 1e-3 for t in range(2, ids.shape[1]))


def test_graphs_without_the_inputs_are_refused(tmp_path):
    from fixtures.make_fixtures import build

    src = build(tmp_path, ["onnx-external-data"])["onnx-external-data"]
    with pytest.raises(ValueError, match="has no past_key_values.*text-generation-with-past"):
        past_zeroed(src, tmp_path / "a")
    with pytest.raises(ValueError, match="has no attention_mask input; its inputs are \\['X'\\]"):
        mask_ignored(src, tmp_path / "b")


@pytest.mark.parametrize("limit", [None, 0])
def test_external_data_is_read_and_written_by_size(limit, onnx_dirs, tmp_path, monkeypatch):
    """A small result is written inline (the source's data file is not copied); past the limit, beside it."""
    import onnx

    from fixtures import faults

    src = tmp_path / "external"
    shutil.copytree(onnx_dirs["llama"], src)
    onnx.save(onnx.load(str(src / "model.onnx")), str(src / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    if limit is not None:
        monkeypatch.setattr(faults, "_INLINE_LIMIT", limit)
    dst = past_zeroed(src, tmp_path / "fault")
    data = set() if limit is None else {"model.onnx_data"}
    assert {p.name for p in dst.iterdir()} == {p.name for p in src.iterdir()} - {"weights.bin"} | data
    _checked(src, dst)
    ids, mask, positions = _prefill()
    assert np.array_equal(_run(src, ids, mask, positions)["logits"], _run(dst, ids, mask, positions)["logits"])


# ---- matmul_perturbed and layer_scaled ---------------------------------------------------------

@pytest.mark.parametrize(("kind", "expected"), [("llama", "/model/layers.1/mlp/gate_proj/MatMul"),
                                                ("gpt2", "/transformer/h.1/mlp/c_fc/Gemm")])
def test_matmul_perturbed_scales_one_weight_of_the_last_layers_mlp(kind, expected, onnx_dirs, tmp_path):
    src = onnx_dirs[kind]
    before = _digest(src)
    dst, name = matmul_perturbed(src, tmp_path / "fault", factor=3.0)
    assert (dst, name) == (tmp_path / "fault", expected) and _digest(src) == before
    a, b = _checked(src, dst)
    node = _node(b, name)
    assert node.op_type == _node(a, name).op_type == ("MatMul" if kind == "llama" else "Gemm")
    changed = _weights_changed(a, b)
    assert list(changed) == [node.input[1]]
    new, old = changed[node.input[1]]
    np.testing.assert_allclose(new, old * 3.0, rtol=1e-6)

    ids, mask, positions = _prefill()
    assert _max_diff(_run(src, ids, mask, positions)["logits"], _run(dst, ids, mask, positions)["logits"]) > 1e-3


def test_matmul_perturbed_picks_by_name_and_refuses_ambiguity(onnx_dirs, tmp_path):
    src = onnx_dirs["llama"]
    assert matmul_perturbed(src, tmp_path / "a", "lm_head")[1] == "/lm_head/MatMul"
    with pytest.raises(ValueError, match="6 MatMul/Gemm/MatMulInteger/MatMulNBits .* matches 'mlp'"):
        matmul_perturbed(src, tmp_path / "b", "mlp")
    with pytest.raises(ValueError, match="no MatMul.* matches 'rotary_emb'"):  # no weight initializer there
        matmul_perturbed(src, tmp_path / "c", "rotary_emb")


def test_a_shared_weight_is_copied_before_it_is_scaled(onnx_dirs, tmp_path):
    import onnx

    src = tmp_path / "shared"
    shutil.copytree(onnx_dirs["llama"], src)
    model = onnx.load(str(src / "model.onnx"))
    gate, up = (_node(model, f"/model/layers.1/mlp/{p}/MatMul") for p in ("gate_proj", "up_proj"))
    up.input[1] = gate.input[1]  # up_proj now reads gate_proj's weight too
    onnx.save(model, str(src / "model.onnx"))

    dst, name = matmul_perturbed(src, tmp_path / "fault", "layers.1/mlp/gate_proj")
    a, b = _checked(src, dst)
    gate_b, up_b = _node(b, name), _node(b, "/model/layers.1/mlp/up_proj/MatMul")
    assert up_b.input[1] == gate.input[1] != gate_b.input[1]
    changed = _weights_changed(a, b)
    assert list(changed) == [gate_b.input[1]]
    new, old = changed[gate_b.input[1]]
    assert old is None
    np.testing.assert_allclose(new, onnx.numpy_helper.to_array(_init(a, gate.input[1])) * 3.0, rtol=1e-6)


@pytest.mark.parametrize(("kind", "layer", "expected"), [
    ("llama", 0, "/model/layers.0/mlp/gate_proj/MatMul"), ("llama", 1, "/model/layers.1/mlp/gate_proj/MatMul"),
    ("gpt2", 0, "/transformer/h.0/mlp/c_fc/Gemm"), ("gpt2", 1, "/transformer/h.1/mlp/c_fc/Gemm")])
def test_layer_scaled_scales_the_first_mlp_product_of_that_layer(kind, layer, expected, onnx_dirs, tmp_path):
    src = onnx_dirs[kind]
    before = _digest(src)
    dst, name = layer_scaled(src, tmp_path / "fault", layer, factor=2.0)
    assert name == expected and _digest(src) == before
    a, b = _checked(src, dst)
    node = _node(b, name)
    assert node.op_type in ("MatMul", "Gemm")
    (new, old), = _weights_changed(a, b).values()
    np.testing.assert_allclose(new, old * 2.0, rtol=1e-6)
    ids, mask, positions = _prefill()
    assert _max_diff(_run(src, ids, mask, positions)["logits"], _run(dst, ids, mask, positions)["logits"]) > 1e-3


def test_layer_scaled_refuses_a_layer_the_graph_lacks(onnx_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"has no decoder layer 2 \(layers 0\.\.1\)"):
        layer_scaled(onnx_dirs["gpt2"], tmp_path / "fault", 2)


# ---- quantized graphs ---------------------------------------------------------------------------

def test_matmul_perturbed_on_int8_reflects_the_integer_weight(quantized, tmp_path):
    from onnx import numpy_helper

    src = quantized["int8"]
    before = _digest(src)
    dst, name = matmul_perturbed(src, tmp_path / "fault")
    assert name == "/model/layers.1/mlp/gate_proj/MatMul_quant" and _digest(src) == before
    a, b = _checked(src, dst)
    node = _node(b, name)
    assert node.op_type == "MatMulInteger"
    (new, old), = _weights_changed(a, b).values()
    zp = numpy_helper.to_array(_init(b, node.input[3])).astype(np.int32)
    assert new.dtype == old.dtype == np.int8
    np.testing.assert_array_equal(new, np.clip(2 * zp - old.astype(np.int32), -128, 127))
    ids, mask, positions = _prefill()
    assert _max_diff(_run(src, ids, mask, positions)["logits"], _run(dst, ids, mask, positions)["logits"]) > 1e-3


def test_layer_scaled_on_matmulnbits_scales_its_scales(quantized, tmp_path):
    src = quantized["int4"]
    dst, name = layer_scaled(src, tmp_path / "fault", 0, factor=3.0)
    a, b = _checked(src, dst)
    node = _node(b, name)
    assert (name, node.op_type) == ("/model/layers.0/mlp/gate_proj/MatMul_Q4", "MatMulNBits")
    changed = _weights_changed(a, b)
    assert list(changed) == [node.input[2]]
    new, old = changed[node.input[2]]
    np.testing.assert_allclose(new, old * 3.0, rtol=1e-6)
    ids, mask, positions = _prefill()
    assert _max_diff(_run(src, ids, mask, positions)["logits"], _run(dst, ids, mask, positions)["logits"]) > 1e-3
