"""quantize --optimize: fused generation graphs built by onnxruntime-genai's model builder, quantized, verified
against PyTorch, and loadable by onnxruntime, optimum's ORTModelForCausalLM and onnxruntime-genai."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import llmconv

og = pytest.importorskip("onnxruntime_genai")


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _torch_greedy(folder, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=model.config.pad_token_id or 0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def fused_int8(fx, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fused") / "llama-int8"
    return llmconv.quantize(fx("llama-hf"), dst, target="cpu"), dst


def test_cpu_default_is_a_fused_int8_graph_verified_against_pytorch(fused_int8):
    r, dst = fused_int8
    assert r.method == "int8-dynamic" and r.passed
    graph = r.options["graph"]
    assert graph["fused"] and graph["tool"].startswith("onnxruntime-genai 0.15.2")
    ops = _ops(dst / "model.onnx")
    # 2 layers: one GroupQueryAttention each, norms fused with the residual adds, Q/K/V packed (5 linear per layer
    # + the head), against the exporter's ~200 nodes and 15 linear layers for the same model.
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert r.linear_ops == 11 and sum(r.ops_quantized.values()) == 11
    assert sum(ops.values()) < 100 and "Transpose" not in ops  # int8 adds DynamicQuantizeLinear, Cast, Mul
    v = r.verification
    assert v.reference == str(r.source) and {c.name for c in v.checks} >= {"decode.cache", "generation"}
    assert any("GroupQueryAttention reads the attention mask as row lengths" in n for n in v.notes)
    assert any(n.startswith("built a fused graph with onnxruntime-genai") for n in r.notes)
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json", "genai_config.json", "generation_config.json", "model.onnx", "model.onnx.data",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    genai = json.loads((dst / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == []


def test_the_fused_folder_generates_the_same_tokens_in_three_runtimes(fused_int8, fx):
    _, dst = fused_int8
    prompt = [5, 17, 99, 300, 42, 7]
    want = _torch_greedy(fx("llama-hf"), prompt, 6)
    model = og.Model(str(dst))  # onnxruntime-genai's own runtime, from genai_config.json
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 6, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    assert got == want
    from optimum.onnxruntime import ORTModelForCausalLM

    ort_model = ORTModelForCausalLM.from_pretrained(dst, trust_remote_code=False)
    ids = torch.tensor([prompt])
    out = ort_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    assert out[0, len(prompt):].tolist() == want


def test_a_wrong_rotary_table_in_a_fused_graph_fails_the_checks(fused_int8, fx, tmp_path, cli):
    """The row-by-row decode must still see what the fused attention does: sin negated turns each key the
    other way. (On this random model attention is nearly uniform, so the logits barely move: the keys show it.)"""
    _, dst = fused_int8
    broken = tmp_path / "broken"
    broken.mkdir()
    model = onnx.load(str(dst / "model.onnx"))
    for t in model.graph.initializer:
        if t.name == "sin_cache":
            arr = -onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    onnx.save(model, str(broken / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    (broken / "config.json").write_bytes((dst / "config.json").read_bytes())
    r = cli("verify", fx("llama-hf"), broken / "model.onnx", "--profile", "int8", "--json")
    assert r.exit_code == 1, r.stdout
    failed = {c["name"] for c in json.loads(r.stdout)["checks"] if not c["passed"]}
    assert {"present.0.key", "decode.cache"} <= failed and "present.0.value" not in failed


def test_gpu_int4_is_built_by_the_builder_for_cuda(fx, tmp_path):
    r = llmconv.quantize(fx("llama-hf"), tmp_path / "g4", target="gpu", method="int4", verify=False)
    ops = _ops(tmp_path / "g4" / "model.onnx")
    assert ops["MatMulNBits"] == 11 and ops["GroupQueryAttention"] == 2
    assert r.options["execution_provider"] == "CUDA" and r.options["bits"] == 4 and r.options["block_size"] == 32
    genai = json.loads((tmp_path / "g4" / "genai_config.json").read_text())
    assert "cuda" in genai["model"]["decoder"]["session_options"]["provider_options"][0]


def test_gpu_fp16_fused_graph_is_verified_on_the_cpu_provider(fx, tmp_path):
    r = llmconv.quantize(fx("llama-hf"), tmp_path / "h.onnx", target="gpu", method="fp16")
    assert r.passed and r.options["graph"]["fused"] and r.options["precision"].startswith("float16")
    assert "verified on the CPU execution provider" in r.notes
    assert 0.45 < r.size_ratio < 0.6  # against the float32 checkpoint (the builder writes fp16 directly)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.onnx", "h.onnx.data"]


def test_what_is_not_fused_says_why(fx, onnx_fx, tmp_path):
    r = llmconv.quantize(fx("gpt2-hf"), tmp_path / "g", target="cpu", method="int4", verify=False)
    assert not r.options["graph"]["fused"]
    assert "GPT2LMHeadModel is not among the architectures" in r.options["graph"]["why"]
    r = llmconv.quantize(onnx_fx("llama-hf"), tmp_path / "l", target="cpu", method="int4", verify=False)
    assert r.options["graph"]["why"].startswith("the source is an ONNX graph")
    assert any(n.startswith("not fused (the source is an ONNX graph") for n in r.notes)
    r = llmconv.quantize(fx("llama-hf"), tmp_path / "n", target="cpu", method="int4", verify=False, optimize=False)
    assert r.options["graph"] == {"fused": False, "why": "--no-optimize"} and "GroupQueryAttention" not in _ops(
        tmp_path / "n" / "model.onnx")


def test_cli_optimize_flag_and_the_graph_row(fx, tmp_path, cli):
    r = cli("quantize", fx("llama-hf"), tmp_path / "p", "--target", "cpu", "--method", "int4", "--no-optimize",
            "--no-verify", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["options"]["graph"] == {"fused": False, "why": "--no-optimize"}
    r = cli("quantize", fx("llama-hf"), tmp_path / "f", "--target", "gpu", "--no-verify")
    assert r.exit_code == 0, r.stderr
    assert "fused by the onnxruntime-genai 0.15.2 model builder" in " ".join(r.stdout.split())
    assert "written as a fused fp16 ONNX graph for CUDA" in " ".join(r.stdout.split())
    assert "Saving" not in r.stderr and "it/s" not in r.stderr  # the builder's own progress bar is kept off
    assert (tmp_path / "f" / "genai_config.json").is_file()


TRAINED_LLAMA = Path(__file__).resolve().parents[2] / "fixtures" / "models" / "trained-llama"


def test_int4_fused_on_the_trained_llama_is_within_the_int4_profile_on_text(tmp_path, heldout):
    """Trained weights (peaked logits): the fused int4 graph passes top-1, perplexity and generation."""
    r = llmconv.quantize(TRAINED_LLAMA, tmp_path / "q4", target="cpu", method="int4", text=heldout)
    assert r.passed and r.options["graph"]["fused"] and r.options["accuracy_level"] == 4
    v = r.verification
    ppl = next(c for c in v.checks if c.name == "perplexity").figures
    assert ppl["tokens"] > 1000 and 0 < ppl["relative_change"] < 0.05, ppl
    logits = next(c for c in v.checks if c.name == "logits")
    assert logits.figures["top1_agreement"] >= 0.75
    assert _ops(tmp_path / "q4" / "model.onnx")["MatMulNBits"] == 11


def test_a_folder_without_tokenizer_files_is_fused_too(fx_copy, tmp_path):
    src = fx_copy("llama-hf")
    for p in src.glob("*token*"):
        p.unlink()
    r = llmconv.quantize(src, tmp_path / "q", target="cpu", method="int4", verify=False)
    assert r.options["graph"]["fused"]
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
        "config.json", "genai_config.json", "generation_config.json", "model.onnx", "model.onnx.data"]
    og.Model(str(tmp_path / "q"))  # onnxruntime-genai loads it (a tokenizer is needed only to encode text)


def test_a_model_the_builder_fails_on_gets_the_exporters_graph(fx_copy, tmp_path):
    """A Llama with an activation the builder does not make (tanh): the default path falls back, and says so."""
    src = fx_copy("llama-hf")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "hidden_act": "tanh"}))
    r = llmconv.quantize(src, tmp_path / "q", target="cpu", method="int4", verify=False)
    graph = r.options["graph"]
    assert not graph["fused"] and "model builder failed: NotImplementedError" in graph["why"]
    assert any(n.startswith("not fused (onnxruntime-genai's model builder failed") for n in r.notes)
    assert "GroupQueryAttention" not in _ops(tmp_path / "q" / "model.onnx")
    assert not (tmp_path / "q" / "genai_config.json").exists()


def test_gpu_to_a_weights_file_is_still_a_cast(fx, tmp_path):
    r = llmconv.quantize(fx("llama-hf"), tmp_path / "h.safetensors", target="gpu")
    assert r.passed and r.verification.mode == "weights" and r.tensors_cast > 0


def test_an_already_fused_graph_quantized_keeps_its_genai_config(fx, tmp_path, cli):
    from llmconv.export import fused
    from llmconv.export.tasks import transformers_view

    src = fx("llama-hf")
    with transformers_view(src) as view:
        fused.build(view, tmp_path / "f32", target="cpu", source=src)
    (tmp_path / "f32" / "config.json").write_bytes((src / "config.json").read_bytes())
    r = llmconv.quantize(tmp_path / "f32", tmp_path / "q4", target="cpu", method="int4", verify=False)
    assert r.options["graph"]["fused"] and r.options["graph"]["tool"] == "the source graph (already fused)"
    og.Model(str(tmp_path / "q4"))
    r = cli("convert", tmp_path / "q4", tmp_path / "hf", "--to", "hf")
    assert r.exit_code == 2 and "built by onnxruntime-genai's model builder" in " ".join(r.stderr.split())


def test_the_builders_quantizer_logs_nothing(fx, tmp_path, cli):
    r = cli("quantize", fx("llama-hf"), tmp_path / "g4", "--target", "gpu", "--method", "int4", "--no-verify",
            "--quiet")
    assert r.exit_code == 0 and r.stderr == "" and r.stdout == ""
