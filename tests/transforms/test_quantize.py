"""llmconv.quantize on real files: each method's ops and sizes, onnxruntime loading and running the
result, verification passing or failing as it should, atomic outputs and clear errors."""

from __future__ import annotations

import filecmp
import json
import re
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

import llmconv
from llmconv.errors import ConversionError, DestinationError, NotEquivalent, Unsupported, UsageError
from tests._lossy import quantize_checked
from tests.transforms._models import leftovers


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _run(path, vocab: int = 1024) -> np.ndarray:
    """Run the model once on seeded ids (no past) and return the first output."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, 8))
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name in ("attention_mask",):
            feeds[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(8)[None, :]
        elif i.name == "token_type_ids":
            feeds[i.name] = np.zeros_like(ids)
        else:  # past key/values, empty
            feeds[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], dtype=np.float32)
    out = sess.run(None, feeds)[0]
    assert np.isfinite(out).all()
    return out


# ---- int8-dynamic ---------------------------------------------------------------------------------


def test_int8_dynamic_is_the_cpu_default_and_quantizes_every_linear_layer(onnx_fx, tmp_path):
    src = onnx_fx("llama-hf")
    dst = tmp_path / "q.onnx"
    r, _ = quantize_checked(src, dst, may_refuse=False, target="cpu")
    assert r.method == "int8-dynamic" and r.notes[0] == "--method auto chose int8-dynamic for --target cpu"
    # 2 layers x 7 projections + lm_head; the attention products (activation x activation) stay float.
    assert r.linear_ops == 15 and r.ops_quantized == {"MatMul": 15} and r.embeddings_quantized == 1
    ops = _ops(dst)
    assert ops["MatMulInteger"] == 15 and ops["MatMul"] == 5 and ops["DynamicQuantizeLinear"] > 0
    assert r.ops_after["MatMulInteger"] == 15 and r.ops_before == {"MatMul": 20, "Gather": 34, "Cast": 31}
    assert r.size_before == (src / "model.onnx").stat().st_size and r.size_after == dst.stat().st_size
    assert 0.3 < r.size_ratio < 0.45  # the tiny model's norms and shape constants stay float
    # Which int8 settings suit the CPU is the CPU's (signed full-range with VNNI; reduce_range or unsigned weights
    # without, and per-channel after a failed try): the report must say what the file holds.
    inits = {t.name: t for t in onnx.load(str(dst)).graph.initializer}
    weights, scale = inits["onnx::MatMul_733_quantized"], inits["onnx::MatMul_733_scale"]
    assert r.options["weight_type"] == {onnx.TensorProto.INT8: "int8 (QInt8, signed)",
                                        onnx.TensorProto.UINT8: "uint8 (QUInt8, unsigned)"}[weights.data_type]
    assert r.options["per_channel"] is (list(scale.dims) == [64])  # one scale per output channel, or one
    # onnxruntime stores a quantized Gather table with its activation type (uint8): one byte either way.
    assert inits["model.embed_tokens.weight_quantized"].data_type == onnx.TensorProto.UINT8
    v = r.verification  # passed, with the figures and verdict measured again by tests/_lossy.py
    assert v is not None and v.passed and v.profile == "int8" and v.mode == "outputs"
    assert v.reference == str(src) and v.candidate == str(dst)
    _run(dst)
    assert leftovers(tmp_path) == []
    j = r.to_json()
    assert j["schema"] == "llmconv.quantize/1" and j["ok"] is True and j["profile"] == "int8"
    assert j["size_ratio"] == round(r.size_ratio, 4) and j["verification"]["ok"] is True
    json.dumps(j)


def test_int8_dynamic_takes_gpt2_gemm_layers(onnx_fx, tmp_path):
    # An explicit int8 method verifies with no fallback: within the profile, or refused on a CPU whose kernels
    # lose too much (tests/_lossy.py); the ops are counted in the file either way.
    r, v = quantize_checked(onnx_fx("gpt2-hf"), tmp_path / "q.onnx", may_refuse=True, target="cpu",
                            method="int8-dynamic")
    assert r.linear_ops == 9 and r.ops_quantized == {"Gemm": 8, "MatMul": 1}
    assert r.embeddings_quantized == 2  # token and position embeddings
    assert r.ops_after["MatMulInteger"] == 9
    if v.passed:  # written
        assert _ops(tmp_path / "q.onnx")["MatMulInteger"] == 9


def test_int8_dynamic_per_channel_and_op_types(onnx_fx, tmp_path):
    """An explicit --method has no fallback, and whether these settings keep the random Llama's top-1 agreement
    above 0.9 is the CPU's doing (0.854 on AVX2 without VNNI, where the U8S8 kernels saturate): each output is
    written within the profile or refused with nothing written, and our own measurement agrees either way."""
    src = onnx_fx("llama-hf")
    a, _ = quantize_checked(src, tmp_path / "pc.onnx", may_refuse=True, target="cpu", method="int8-dynamic",
                            per_channel=True)
    b, _ = quantize_checked(src, tmp_path / "mm.onnx", may_refuse=True, target="cpu", method="int8-dynamic",
                            op_types=["MatMul"])
    assert a.options["per_channel"] is True and a.ops_quantized == {"MatMul": 15}
    assert b.options["op_types"] == ["MatMul"] and b.embeddings_quantized == 0
    assert b.size_after > a.size_after  # the float32 embedding is kept


# ---- int8-static ----------------------------------------------------------------------------------


def test_int8_static_qdq_on_linear_layers_only_with_synthetic_calibration(onnx_fx, tmp_path):
    dst = tmp_path / "s.onnx"
    r, v = quantize_checked(onnx_fx("llama-hf"), dst, may_refuse=True, target="cpu", method="int8-static")
    assert r.ops_quantized == {"MatMul": 15} and r.options["format"] == "QDQ"
    assert r.options["calibration"]["kind"] == "synthetic" and r.options["calibration"]["samples"] == 8
    assert r.options["activation_type"] == "uint8"
    if not v.passed:  # refused on this CPU (tests/_lossy.py measured it): the graph is not there to read
        return
    model = onnx.load(str(dst))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMul"] == 20 and ops["DequantizeLinear"] > 0
    # Only linear layers take quantized inputs: the attention products read float activations.
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    attn = [n for n in model.graph.node if n.op_type == "MatMul" and n.name.endswith(("self_attn/MatMul",
                                                                                        "self_attn/MatMul_1"))]
    assert attn and all(produced_by.get(i) != "DequantizeLinear" for n in attn for i in n.input)
    _run(dst)


def test_int8_static_calibrates_from_an_npz(onnx_fx, tmp_path):
    ids = np.random.default_rng(3).integers(0, 1024, size=(3, 2, 12))  # 3 batches of [2, 12]
    npz = tmp_path / "calib.npz"
    np.savez(npz, input_ids=ids)
    r, _ = quantize_checked(onnx_fx("gpt2-hf"), tmp_path / "s.onnx", may_refuse=True, target="cpu",
                            method="int8-static", calibration=npz)
    assert r.options["calibration"] == {"kind": "npz", "file": str(npz), "samples": 3}
    assert r.ops_quantized == {"Gemm": 8, "MatMul": 1}


def test_int8_static_calibrates_from_text_with_the_models_tokenizer(onnx_fx, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 37) % 1000}" for i in range(600)))  # the fixture tokenizer's words
    r, _ = quantize_checked(onnx_fx("gpt2-hf"), tmp_path / "s.onnx", may_refuse=True, target="cpu",
                            method="int8-static", calibration=text, calibration_samples=4)
    assert r.options["calibration"]["kind"] == "text" and r.options["calibration"]["samples"] == 4


def test_calibration_errors_name_the_file_and_the_fix(onnx_fx, tmp_path):
    src = onnx_fx("gpt2-hf")
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixel_values=np.zeros((1, 3)))
    with pytest.raises(UsageError, match=r"bad.npz: calibration arrays \['pixel_values'\] are not inputs.*input_ids"):
        llmconv.quantize(src, tmp_path / "s.onnx", target="cpu", method="int8-static", calibration=bad)
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    with pytest.raises(UsageError, match="fewer than one window of 64.*give a longer text"):
        llmconv.quantize(src, tmp_path / "s.onnx", target="cpu", method="int8-static", calibration=short)
    with pytest.raises(UsageError, match="--calibration applies to --method int8-static, not int8-dynamic"):
        llmconv.quantize(src, tmp_path / "s.onnx", target="cpu", calibration=short)
    assert leftovers(tmp_path) == [] and not (tmp_path / "s.onnx").exists()


@pytest.mark.parametrize(("arrays", "message"), [
    ({"input_ids": np.arange(32)}, r"'input_ids' has shape \[32\], but the model's input_ids is \[batch_size, "),
    ({"input_ids": np.zeros((2, 2, 1, 32), np.int64)}, r"'input_ids' has shape \[2, 2, 1, 32\]"),
    ({"input_ids": np.random.default_rng(0).random((2, 32))}, r"'input_ids' holds float64 values, but the model's "
                                                               r"input_ids takes int64"),
    ({"input_ids": np.zeros((3, 2, 16), np.int64), "attention_mask": np.ones((2, 2, 16), np.int64)},
     r"hold different numbers of samples: input_ids 3, attention_mask 2"),
])
def test_calibration_arrays_of_the_wrong_rank_or_kind_are_refused(onnx_fx, tmp_path, arrays, message):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(UsageError, match=message):
        llmconv.quantize(onnx_fx("gpt2-hf"), tmp_path / "s.onnx", target="cpu", method="int8-static",
                         calibration=bad)
    assert leftovers(tmp_path) == [] and not (tmp_path / "s.onnx").exists()


# ---- int4 -----------------------------------------------------------------------------------------


def test_int4_matmulnbits_with_gemm_rewritten_for_gpt2(onnx_fx, tmp_path):
    dst = tmp_path / "q4.onnx"
    r = llmconv.quantize(onnx_fx("gpt2-hf"), dst, target="gpu", method="int4")
    assert r.ops_quantized == {"Gemm": 8, "MatMul": 1} and r.ops_after["MatMulNBits"] == 9
    assert any("rewrote 8 Gemm nodes as MatMul+Add" in n for n in r.notes)
    assert "verified on the CPU execution provider" in r.notes
    assert r.options["block_size"] == 32 and r.options["embedding"] == "float32"
    assert r.options["accuracy_level"] == 0  # CUDA ignores it; the CPU target asks for int8 compute (4)
    assert "CUDA" in r.options["kernel"]
    nbits = [n for n in onnx.load(str(dst)).graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32 and nbits[0].domain == "com.microsoft"
    assert r.verification.passed and r.verification.profile == "int4"
    _run(dst)


def test_int4_block_size_and_embedding(onnx_fx, tmp_path):
    src = onnx_fx("gpt2-hf")
    a = llmconv.quantize(src, tmp_path / "b64.onnx", target="cpu", method="int4", block_size=64, verify=False)
    b = llmconv.quantize(src, tmp_path / "emb.onnx", target="cpu", method="int4",
                         op_types=["MatMul", "Gemm", "Gather"], verify=False)
    nbits = [n for n in onnx.load(str(tmp_path / "b64.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert {x.name: x.i for x in nbits[0].attribute}["block_size"] == 64
    assert {x.name: x.i for x in nbits[0].attribute}["accuracy_level"] == 4 and a.options["accuracy_level"] == 4
    assert b.ops_after["GatherBlockQuantized"] == 2 and b.options["embedding"].startswith("int4")
    assert b.size_after < a.size_after
    _run(tmp_path / "emb.onnx")
    with pytest.raises(UsageError, match="--block-size 48 is not a power of two"):
        llmconv.quantize(src, tmp_path / "x.onnx", target="cpu", method="int4", block_size=48)


# ---- fp16 -----------------------------------------------------------------------------------------


def test_fp16_keeps_float32_io_and_sensitive_ops(onnx_fx, tmp_path):
    dst = tmp_path / "h.onnx"
    r = llmconv.quantize(onnx_fx("llama-hf"), dst, target="gpu")
    assert r.method == "fp16" and r.notes[0] == "--method auto chose fp16 for --target gpu"
    assert r.options["keep_io_types"] is True
    assert r.options["kept_fp32_ops"] == {"Pow": 5, "ReduceMean": 5, "Sqrt": 5, "Softmax": 2, "Range": 3}
    model = onnx.load(str(dst))
    assert {i.type.tensor_type.elem_type for i in model.graph.input if i.name.startswith("past")} == {1}
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    # The RMSNorm reduction runs in float32: its Pow reads a Cast to float.
    produced = {o: n for n in model.graph.node for o in n.output}
    pows = [n for n in model.graph.node if n.op_type == "Pow"]
    assert all(produced[n.input[0]].op_type == "Cast" for n in pows)
    assert 0.5 < r.size_ratio < 0.65 and r.verification.passed and r.verification.profile == "fp16"
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)  # onnxruntime needs unique names
    _run(dst)


# ---- hf sources and weights -----------------------------------------------------------------------


def test_hf_folder_is_exported_first_and_the_folder_output_carries_the_tokenizer(fx, tmp_path):
    dst = tmp_path / "out"
    r = llmconv.quantize(fx("llama-hf"), dst, target="cpu", method="int4", verify=False, optimize=False)
    assert r.options["graph"] == {"fused": False, "why": "--no-optimize"}
    assert r.source_format == "hf" and any(n.startswith("exported ") for n in r.notes)
    names = sorted(p.name for p in dst.iterdir())
    assert names == ["config.json", "generation_config.json", "model.onnx", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer_config.json"]
    assert _ops(dst / "model.onnx")["MatMulNBits"] == 15
    assert leftovers(tmp_path) == []


def test_weights_casts_fp16_and_bf16_with_the_matching_profile(fx, tmp_path):
    src = fx("llama.safetensors")
    r = llmconv.quantize(src, tmp_path / "h.safetensors", target="gpu")
    assert r.method == "fp16" and r.tensors_cast == 21 and r.verification.profile == "fp16"
    assert r.verification.mode == "weights" and r.verification.passed
    assert 0.49 < r.size_ratio < 0.51
    assert {t.dtype for t in load_file(tmp_path / "h.safetensors").values()} == {torch.float16}
    b = llmconv.quantize(fx("bert.pt"), tmp_path / "b.bin", target="cpu")  # a bare file has no graph
    assert b.method == "bf16" and b.notes[0] == "--method auto chose bf16 for --target cpu"
    assert b.verification.profile == "bf16" and b.verification.passed
    sd = torch.load(tmp_path / "b.bin", weights_only=True)
    assert {t.dtype for t in sd.values() if t.is_floating_point()} == {torch.bfloat16}
    c = llmconv.quantize(fx("gpt2-hf"), tmp_path / "bf", target="cpu", method="bf16")  # folder stays hf
    assert c.source_format == "hf" and (tmp_path / "bf" / "tokenizer.json").is_file()
    assert {t.dtype for t in load_file(tmp_path / "bf" / "model.safetensors").values()} == {torch.bfloat16}


def test_fp16_overflow_is_refused_and_leaves_nothing(fx, tmp_path):
    dst = tmp_path / "h.safetensors"
    with pytest.raises(ConversionError, match="tensor 'big' has a value of magnitude 70000.*--dtype bf16"):
        llmconv.quantize(fx("fp16-overflow.safetensors"), dst, target="gpu")
    assert not dst.exists() and leftovers(tmp_path) == []


def test_methods_that_do_not_fit_the_source_are_refused(fx, onnx_fx, tmp_path):
    with pytest.raises(Unsupported, match="int8-dynamic quantizes an ONNX graph, and a bare safetensors weights"):
        llmconv.quantize(fx("llama.safetensors"), tmp_path / "q.safetensors", target="cpu", method="int8-dynamic")
    with pytest.raises(Unsupported, match="bf16 is a weights cast"):
        llmconv.quantize(onnx_fx("gpt2-hf"), tmp_path / "q.onnx", target="cpu", method="bf16")
    with pytest.raises(UsageError, match="unknown --target 'tpu'"):
        llmconv.quantize(onnx_fx("gpt2-hf"), tmp_path / "q.onnx", target="tpu")
    with pytest.raises(UsageError, match="unknown --method 'int2'"):
        llmconv.quantize(onnx_fx("gpt2-hf"), tmp_path / "q.onnx", target="cpu", method="int2")
    with pytest.raises(UsageError, match="cannot be written as safetensors"):
        llmconv.quantize(onnx_fx("gpt2-hf"), tmp_path / "q.safetensors", target="cpu")
    with pytest.raises(UsageError, match="--op-types Conv: int4 quantizes Gather, Gemm, MatMul"):
        llmconv.quantize(onnx_fx("gpt2-hf"), tmp_path / "q.onnx", target="cpu", method="int4", op_types=["Conv"])
    assert list(tmp_path.iterdir()) == []


# ---- verification, atomicity, external data, determinism --------------------------------------------


def test_failed_verification_raises_and_leaves_nothing(onnx_fx, tmp_path):
    dst = tmp_path / "q.onnx"
    with pytest.raises(NotEquivalent, match=r"int8-dynamic output is not within the int8 profile.*nothing was "
                                            r"written") as e:
        llmconv.quantize(onnx_fx("llama-hf"), dst, target="cpu", atol=1e-7, rtol=0.0)
    report = e.value.report
    assert not report.passed and report.failures()[0].name == "logits"
    assert not dst.exists() and list(tmp_path.iterdir()) == []


def test_existing_destination_needs_force(onnx_fx, tmp_path):
    dst = tmp_path / "q.onnx"
    dst.write_text("old")
    with pytest.raises(DestinationError, match="destination exists"):
        llmconv.quantize(onnx_fx("gpt2-hf"), dst, target="cpu")
    assert dst.read_text() == "old"
    llmconv.quantize(onnx_fx("gpt2-hf"), dst, target="cpu", force=True, verify=False)
    assert _ops(dst)["MatMulInteger"] == 9


def test_external_data_source_gives_an_external_data_output(external_fx, tmp_path):
    src = external_fx("gpt2-hf")
    dst = tmp_path / "q.onnx"
    r = llmconv.quantize(src / "model.onnx", dst, target="cpu", method="int4")
    assert [p.name for p in map(type(dst), r.files)] == ["q.onnx.data", "q.onnx"]
    assert (tmp_path / "q.onnx.data").stat().st_size > 0
    assert r.size_before == sum(p.stat().st_size for p in src.glob("model.onnx*"))
    assert r.verification.passed
    _run(dst)
    (tmp_path / "other.onnx.data").write_text("keep me")
    with pytest.raises(DestinationError, match="other.onnx.data: destination's external data file exists"):
        llmconv.quantize(src, tmp_path / "other.onnx", target="cpu")
    assert (tmp_path / "other.onnx.data").read_text() == "keep me" and not (tmp_path / "other.onnx").exists()


@pytest.mark.parametrize("method", ["int8-dynamic", "fp16"])
def test_external_data_source_to_a_relative_destination_through_a_link(external_fx, tmp_path, monkeypatch, method):
    """The output's data file must survive whatever path spells the destination (relative, or under a
    symlinked folder); fp16 must type the graph although the weights are outside the proto."""
    src = external_fx("llama-hf")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    # int8's verdict is the CPU's (tests/_lossy.py): refused, nothing is left under either spelling
    _, v = quantize_checked(src / "model.onnx", "link/q.onnx", may_refuse=method.startswith("int8"), target="cpu",
                            method=method)
    if not v.passed:
        assert list((tmp_path / "real").iterdir()) == []
        return
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["q.onnx", "q.onnx.data"]
    out = onnx.load(str(tmp_path / "real" / "q.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer)
    if method == "fp16":
        assert {i.type.tensor_type.elem_type for i in out.graph.input if i.name == "attention_mask"} == {
            onnx.TensorProto.INT64}
        assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in out.graph.output)
    _run(tmp_path / "real" / "q.onnx")


def test_force_over_an_external_data_model_removes_its_old_data_file(external_fx, onnx_fx, tmp_path):
    dst = tmp_path / "q.onnx"
    llmconv.quantize(external_fx("gpt2-hf") / "model.onnx", dst, target="cpu", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]
    llmconv.quantize(onnx_fx("gpt2-hf"), dst, target="cpu", verify=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]  # no data file left from the old model
    _run(dst)


def test_same_flags_give_identical_bytes(onnx_fx, tmp_path):
    src = onnx_fx("gpt2-hf")
    for name in ("a.onnx", "b.onnx"):
        llmconv.quantize(src, tmp_path / name, target="cpu", method="int8-static", verify=False)
    assert filecmp.cmp(tmp_path / "a.onnx", tmp_path / "b.onnx", shallow=False)


# ---- the trained fixture: quality figures that mean something ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8-dynamic", "int4"])
def test_trained_model_keeps_its_perplexity(trained_onnx, heldout, tmp_path, method):
    # Perplexity and agreement measured again independently (tests/_lossy.py). int4's products are small enough
    # for every CPU's int8 kernels; an explicit int8-dynamic has no fallback, and may be refused where they
    # saturate (then nothing is written).
    _, v = quantize_checked(trained_onnx, tmp_path / "q.onnx", may_refuse=method == "int8-dynamic", target="cpu",
                            method=method, text=heldout)
    ppl = next(c for c in v.checks if c.name == "perplexity").figures
    budget = 0.02 if method == "int8-dynamic" else 0.10
    assert ppl["budget"] == budget and ppl["tokens"] > 1000
    if v.passed:
        assert ppl["relative_change"] <= budget
        logits = next(c for c in v.checks if c.name == "logits").figures
        assert logits["top1_agreement"] >= (0.9 if method == "int8-dynamic" else 0.75)


@pytest.mark.slow
def test_trained_model_perplexity_budget_can_fail(trained_onnx, heldout, tmp_path):
    with pytest.raises(NotEquivalent, match="perplexity"):
        llmconv.quantize(trained_onnx, tmp_path / "q.onnx", target="cpu", method="int4", text=heldout,
                         max_ppl_increase=1e-6)
    assert list(tmp_path.iterdir()) == []


# ---- unsafe and broken external data; models whose inputs must be given -----------------------------


@pytest.mark.parametrize(("fixture", "message"), [
    ("onnx-external-escape", "external data file path '../escape-target.dat' leaves the model's folder"),
    ("onnx-external-absolute", "external data file path '/etc/hostname' is absolute"),
    ("onnx-external-truncated", "tensor 'W' reads bytes 0..48 of 'weights.bin', which holds 20 (truncated?)"),
])
def test_unsafe_or_broken_external_data_is_refused_by_quantize_and_prune(fx, tmp_path, fixture, message):
    from llmconv.errors import InputError

    with pytest.raises(InputError, match=re.escape(message)):
        llmconv.quantize(fx(fixture), tmp_path / "q.onnx", target="cpu")
    with pytest.raises(InputError, match=re.escape(message)):
        llmconv.prune(fx(fixture), tmp_path / "p.onnx", sparsity=0.5, include=["W"])
    assert list(tmp_path.iterdir()) == []


def test_inputs_the_verifier_cannot_make_up_are_given_as_npz(fx, tmp_path):
    src = fx("onnx-external-data")  # Y = X @ W + B, W in weights.bin
    with pytest.raises(UsageError, match="inputs llmconv cannot make up: X"):
        llmconv.quantize(src, tmp_path / "q.onnx", target="cpu")
    npz = tmp_path / "x.npz"
    np.savez(npz, X=np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32))
    r, v = quantize_checked(src, tmp_path / "q.onnx", may_refuse=False, target="cpu", inputs=npz)
    assert r.ops_quantized == {"MatMul": 1} and v.passed and v.inputs["file"] == str(npz)
    p = llmconv.prune(src, tmp_path / "p.onnx", sparsity=0.5, include=["W"], inputs=npz)
    assert p.overall == 0.5 and p.quality.passed


@pytest.mark.slow
def test_trained_model_int8_static_calibrated_on_text_and_fp16(trained_onnx, heldout, tmp_path):
    s, v = quantize_checked(trained_onnx, tmp_path / "s.onnx", may_refuse=True, target="cpu", method="int8-static",
                            calibration=heldout, text=heldout)
    assert s.options["calibration"]["kind"] == "text" and s.options["calibration"]["seq_len"] == 64
    ppl = next(c for c in v.checks if c.name == "perplexity").figures
    assert ppl["tokens"] > 1000 and (ppl["relative_change"] <= 0.02 or not v.passed)
    h = llmconv.quantize(trained_onnx, tmp_path / "h", target="gpu", text=heldout)
    ppl = next(c for c in h.verification.checks if c.name == "perplexity").figures
    assert h.method == "fp16" and abs(ppl["relative_change"]) <= 0.005
