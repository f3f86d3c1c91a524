"""The name record (issue 11, item 8): an export writes which initializer holds which checkpoint tensor into the
graph, ``convert model.onnx out --to hf`` gives the checkpoint back under its own names (loads in transformers, same
logits), and ``verify HF GRAPH`` compares the graph's weights with the checkpoint's tensor by tensor."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch

from llmconv.formats import registry
from llmconv.formats.onnx import TENSOR_MAP_KEY, Holder, open_model, read_name_record
from llmconv.verification.weights import compare_graph_weights
from tests.export import _exports

NO_RECORD = "cannot write an hf folder from this graph: the graph carries no name record"


def _tensors(path):
    with registry.open_checkpoint(path) as src:
        return {n: src.tensor(n).clone() for n in src.names()}


def _without_record(folder, dst):
    shutil.copytree(folder, dst)
    model = onnx.load(str(dst / "model.onnx"))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != TENSOR_MAP_KEY]
    del model.metadata_props[:]
    for k, v in kept:
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(dst / "model.onnx"))
    return dst


@pytest.mark.parametrize(("name", "transposed"), [("llama-hf", 15), ("gpt2-hf", 0)])
def test_export_records_every_checkpoint_tensor(exported, fx, cli, name, transposed):
    folder, _ = exported(name)
    record = read_name_record(folder)
    assert record is not None and record.unavailable is None
    with registry.open_checkpoint(fx(name)) as checkpoint, open_model(folder) as graph:
        assert sorted(record.tensors) == sorted(checkpoint.names()) and record.absent() == []
        # Llama's Linear weights are folded into transposed MatMul initializers; GPT-2's Conv1D is stored as it is.
        assert sum(t.holders[0].transform == "transpose" for t in record.tensors.values()) == transposed
        check = compare_graph_weights(checkpoint, graph)
    assert check.passed and check.figures["equal"] and check.figures["max_abs"] == 0.0
    assert check.figures["tensors"] == len(record.tensors)
    assert record.config == json.loads((fx(name) / "config.json").read_text()) and record.dtype == "float32"
    if name == "gpt2-hf":  # the tied head is the embedding's transposed copy: both initializers hold it
        wte = record.tensors["transformer.wte.weight"].holders
        assert wte[0] == Holder("transformer.wte.weight", "identity") and [h.transform for h in wte] == [
            "identity", "transpose"] and check.figures["initializers"] == len(record.tensors) + 1
    else:  # the exporter stores the identical all-ones norm weights once: five names, one initializer
        norms = {t.holders[0].initializer for n, t in record.tensors.items() if n.endswith("norm.weight")}
        assert len(norms) == 1
    r = cli("inspect", folder, "--json")
    info = json.loads(r.stdout)
    assert TENSOR_MAP_KEY not in info["metadata"]  # the record itself is for the readers; inspect sums it up
    assert info["name_record"] == {"tensors": len(record.tensors), "transposed": transposed, "absent": [],
                                   "model_type": record.config["model_type"], "dtype": "float32"}


@pytest.mark.parametrize("name", ["llama-hf", "gpt2-hf"])
def test_onnx_to_hf_loads_in_transformers_with_the_original_logits(exported, fx, cli, tmp_path, name):
    import transformers

    folder, _ = exported(name)
    out = tmp_path / "back"
    r = cli("convert", folder, out, "--to", "hf")
    assert r.exit_code == 0, r.output
    assert "checkpoint names restored from the graph's name record" in r.stdout
    assert "verified: all" in r.stdout and "(weights, exact)" in r.stdout
    # The very bytes save_pretrained wrote, and the original config, tokenizer and generation config.
    assert (out / "model.safetensors").read_bytes() == (fx(name) / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((fx(name) / "config.json").read_text())
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    original = transformers.AutoModelForCausalLM.from_pretrained(fx(name), trust_remote_code=False).eval()
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False,
                                                                     output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    ids = torch.randint(0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(original(ids).logits, loaded.eval()(ids).logits)


def test_a_lone_graph_file_restores_names_and_config(exported, fx, cli, tmp_path):
    folder, _ = exported("llama-hf")
    lone = tmp_path / "lone" / "llama.onnx"  # no model folder around it: no tokenizer to carry
    lone.parent.mkdir()
    shutil.copyfile(folder / "model.onnx", lone)
    r = cli("convert", lone, tmp_path / "w.safetensors")
    assert r.exit_code == 0, r.output
    original = _tensors(fx("llama-hf"))
    written = _tensors(tmp_path / "w.safetensors")
    assert sorted(written) == sorted(original)
    assert all(torch.equal(written[n], original[n]) for n in original)
    r = cli("convert", lone, tmp_path / "hf", "--to", "hf")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert "no tokenizer or generation files: the graph does not sit in a model folder" in r.stdout


def test_graph_without_a_usable_record(exported, cli, tmp_path):
    folder, _ = exported("llama-hf")
    bare = _without_record(folder, tmp_path / "bare")
    r = cli("convert", bare, tmp_path / "w.safetensors")
    assert r.exit_code == 0, r.output
    assert "tensors keep their ONNX initializer names: the graph carries no name record" in r.stdout
    with registry.open_checkpoint(tmp_path / "w.safetensors") as w:
        assert "model.embed_tokens.weight" in w.infos and sum(n.startswith("onnx::MatMul_") for n in w.names()) == 15
    r = cli("convert", bare, tmp_path / "hf", "--to", "hf")
    assert r.exit_code == 2
    assert NO_RECORD in r.stderr and "exported by another tool, or by an llmconv older than the record" in r.stderr
    assert "llmconv convert HF_FOLDER OUT --to onnx" in r.stderr and "llmconv-tmp" not in r.stderr
    assert not (tmp_path / "hf").exists()

    # A record whose initializer is no longer what it was (cast to float16 after export) names the tensor.
    def to_fp16(arrays):
        arrays["model.embed_tokens.weight"] = arrays["model.embed_tokens.weight"].astype("float16")

    changed = _exports.edit_initializers(folder, tmp_path / "changed", to_fp16)
    r = cli("convert", changed, tmp_path / "hf", "--to", "hf")
    assert r.exit_code == 2
    assert ("its name record no longer matches its initializers: it holds model.embed_tokens.weight (float32 "
            "[1024, 64]) in initializer 'model.embed_tokens.weight', which is now float16 [1024, 64]") in r.stderr


def test_quantize_drops_the_record_and_prune_keeps_it(exported, cli, tmp_path):
    from llmconv import prune, quantize

    folder, _ = exported("llama-hf")
    quantize(folder, tmp_path / "q", target="cpu", method="int8-dynamic", verify=False)
    r = cli("convert", tmp_path / "q", tmp_path / "hf", "--to", "hf")
    assert r.exit_code == 2 and not (tmp_path / "hf").exists()
    assert ("cannot write an hf folder from this graph: llmconv quantize (int8-dynamic) replaced its weights"
            in r.stderr)
    prune(folder, tmp_path / "p", sparsity=0.5, verify=False)
    r = cli("convert", tmp_path / "p", tmp_path / "p.safetensors")
    assert r.exit_code == 0, r.output
    pruned = _tensors(tmp_path / "p.safetensors")  # the pruned values, under the checkpoint's names
    assert float((pruned["model.layers.0.self_attn.q_proj.weight"] == 0).float().mean()) == 0.5
    assert not (pruned["model.embed_tokens.weight"] == 0).any()


def test_verify_compares_every_embedding_row_the_outputs_never_read(exported, fx, cli, tmp_path):
    """Two swapped rows of a GPT-NeoX embedding: token ids 1000 and 1001 are never drawn by the verification's inputs
    or generated, so every outputs check passes; the weights check names the embedding."""
    folder, _ = exported("gpt_neox-hf")

    def swap(arrays):
        e = arrays["gpt_neox.embed_in.weight"]
        e[[1000, 1001]] = e[[1001, 1000]]

    swapped = _exports.edit_initializers(folder, tmp_path / "swapped", swap)
    r = cli("verify", fx("gpt_neox-hf"), swapped, "--json")
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    failed = [c for c in report["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["weights"] and len(report["checks"]) > 5  # the outputs checks all pass
    check = failed[0]
    assert check["worst"] == "gpt_neox.embed_in.weight (initializer 'gpt_neox.embed_in.weight')"
    assert check["differ"] == 1 and check["tensors"] == 28 and check["failed"] == ["gpt_neox.embed_in.weight"]
    assert check["reason"].startswith("1 of 28 tensors differ from the checkpoint's; worst gpt_neox.embed_in.weight")
    with registry.open_checkpoint(fx("gpt_neox-hf")) as checkpoint, open_model(folder) as graph:
        assert compare_graph_weights(checkpoint, graph).passed  # the unchanged export passes the same check


def test_formats_states_the_condition(cli):
    r = cli("formats", "--json")
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.formats/1" and "hf" in out["conversions"]["onnx"]  # fields added, none removed
    conditions = out["conversion_conditions"]["onnx"]
    assert conditions["hf"].startswith("only a graph llmconv exported") and "exits 2" in conditions["hf"]
    assert conditions["safetensors"] == conditions["pytorch"]
    assert "else the ONNX initializer names" in conditions["pytorch"]
    r = cli("formats", env={"COLUMNS": "200"})
    assert "yes*" in r.stdout and "* onnx -> hf: only a graph llmconv exported" in r.stdout
