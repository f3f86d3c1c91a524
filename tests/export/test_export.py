"""hf folder -> ONNX: every architecture, with and without past key/values, exported and verified."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from llmconv.errors import DestinationError, NotEquivalent, Unsupported, UsageError
from llmconv.export import to_onnx
from llmconv.export.onnx_post import ort_max_ir_version
from tests.export._exports import ARCHITECTURES, DECODERS

CASES = [(a, None) for a in ARCHITECTURES] + [(a, "text-generation") for a in DECODERS]


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("name", "task"), CASES, ids=[f"{a}-{t or 'auto'}" for a, t in CASES])
def test_export_is_verified_against_pytorch(exported, name, task):
    folder, report = exported(f"{name}-hf", task)
    v = report.verification
    assert v is not None and v.passed, v.summary()
    assert v.mode == "outputs" and v.profile == "fp32"
    expected_task = task or ("feature-extraction" if name == "bert" else "text-generation-with-past")
    assert report.extra["task"] == expected_task
    assert report.extra["exporter"] == "optimum"
    names = [c.name for c in v.checks]
    if name == "bert":
        assert names == ["last_hidden_state"]
    elif task is None:  # the cached decode loop and generation, through the graph's own past
        assert names == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")] + [
            "decode.prefill", "decode.steps", "decode.consistency", "decode.cache", "generation"]
    else:  # no past: the graph recomputes the sequence at each step, and there is no cache to compare
        assert names == ["logits", "decode.prefill", "decode.steps", "generation"]
    for c in v.checks:
        if c.name == "generation":
            assert c.figures["identical"] == c.figures["prompts"] == 4 and c.figures["agreement"] == 1.0
            continue
        # The fp32 export matches PyTorch to float rounding (FIELD-NOTES: < 5e-7 on these models).
        assert c.figures["max_abs"] < 5e-6, (c.name, c.figures)
        assert c.figures["nan"] == 0 and c.figures["cosine"] > 0.99999
    # Two sequence lengths and a padded row were exercised.
    # Two samples asked for, and the one-row, one-token sample every verification adds (what a decode step is).
    assert v.inputs == {"batch": 2, "seq_len": 16, "samples": 3, "seed": 0, "shapes": [[2, 16], [2, 8], [1, 1]]}
    # The folder carries what onnxruntime and optimum's ORTModel classes need.
    files = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    if name != "bert":
        assert "generation_config.json" in files
    assert not any(f.endswith((".safetensors", ".bin")) for f in files)
    assert report.files == sorted(str(folder / f) for f in files)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert model.ir_version <= ort_max_ir_version()
    assert report.extra["ir_version"] == model.ir_version
    assert report.extra["opset"] == 18 == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inputs = [i.name for i in _session(folder / "model.onnx").get_inputs()]
    assert ("past_key_values.0.key" in inputs) == (task is None and name != "bert")


def test_ort_max_ir_version_is_what_onnxruntime_loads():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    top = ort_max_ir_version()
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    ok = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=top)
    ort.InferenceSession(ok.SerializeToString(), providers=["CPUExecutionProvider"])
    if top < onnx.IR_VERSION:
        too_new = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=top + 1)
        with pytest.raises(Exception, match="(?i)ir version|unsupported model"):
            ort.InferenceSession(too_new.SerializeToString(), providers=["CPUExecutionProvider"])


def test_ort_model_classes_load_the_export(exported):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForFeatureExtraction
    from transformers import AutoModel, AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 300, 2, 9, 44]])
    mask = torch.ones_like(ids)
    for name, ort_cls, hf_cls, key in (("llama", ORTModelForCausalLM, AutoModelForCausalLM, "logits"),
                                       ("bert", ORTModelForFeatureExtraction, AutoModel, "last_hidden_state")):
        folder, report = exported(f"{name}-hf")
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        ort_model = ort_cls.from_pretrained(folder, session_options=so)
        hf = hf_cls.from_pretrained(report.source).eval()
        with torch.no_grad():
            expected = getattr(hf(input_ids=ids, attention_mask=mask), key).numpy()
        got = getattr(ort_model(input_ids=ids, attention_mask=mask), key)
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_file_destination_with_external_data(fx, tmp_path):
    dst = tmp_path / "out" / "gpt2.onnx"
    report = to_onnx(fx("gpt2-hf"), dst, src_format="hf", dtype="keep", verify=True, force=False,
                     external_data=True)
    data = tmp_path / "out" / "gpt2.onnx_data"
    assert report.verification.passed and report.extra["external_data"] is True
    assert sorted(p.name for p in dst.parent.iterdir()) == ["gpt2.onnx", "gpt2.onnx_data"]
    assert report.files == [str(dst), str(data)]
    assert report.bytes_written == dst.stat().st_size + data.stat().st_size
    assert oct(data.stat().st_mode & 0o777) == "0o644"
    model = onnx.load(str(dst), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"gpt2.onnx_data"}
    # The weights live in the data file: the graph itself is small.
    assert dst.stat().st_size < data.stat().st_size / 5
    assert "config and tokenizer files are written only with a folder destination" in report.notes


def test_opset_is_honoured(fx, tmp_path):
    dst = tmp_path / "qwen2-opset17.onnx"
    report = to_onnx(fx("qwen2-hf"), dst, src_format="hf", dtype="keep", verify=True, force=False, opset=17,
                     task="text-generation")
    model = onnx.load(str(dst))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert report.extra["opset"] == 17 and report.verification.passed


def test_opset_out_of_range_is_refused(fx, tmp_path):
    with pytest.raises(UsageError, match=r"--opset 99 is outside what the exporter writes \(7\.\.20\)"):
        to_onnx(fx("gpt2-hf"), tmp_path / "m.onnx", src_format="hf", dtype="keep", verify=True, force=False,
                opset=99)
    assert not (tmp_path / "m.onnx").exists()


def test_task_the_architecture_lacks_is_refused(fx, tmp_path):
    with pytest.raises(Unsupported, match="optimum exports bert for .*not for task 'text-generation-with-past'"):
        to_onnx(fx("bert-hf"), tmp_path / "b.onnx", src_format="hf", dtype="keep", verify=True, force=False,
                task="text-generation-with-past")
    with pytest.raises(UsageError, match="task 'object-detection' is not one llmconv can export and verify"):
        to_onnx(fx("bert-hf"), tmp_path / "b.onnx", src_format="hf", dtype="keep", verify=True, force=False,
                task="object-detection")


def test_fp16_export_points_to_quantize(fx, tmp_path):
    with pytest.raises(Unsupported, match="llmconv quantize MODEL.onnx OUT.onnx --method fp16"):
        to_onnx(fx("gpt2-hf"), tmp_path / "m.onnx", src_format="hf", dtype="fp16", verify=True, force=False)


def test_bare_weights_need_a_config(fx, tmp_path):
    with pytest.raises(UsageError, match="pass --config path/to/config.json") as e:
        to_onnx(fx("llama.safetensors"), tmp_path / "m.onnx", src_format="safetensors", dtype="keep", verify=True,
                force=False)
    assert "an ONNX graph needs the model's config" in str(e.value)
    report = to_onnx(fx("llama.safetensors"), tmp_path / "m.onnx", src_format="safetensors", dtype="keep",
                     verify=True, force=False, config=fx("llama-hf") / "config.json")
    assert report.verification.passed and report.source_format == "safetensors"
    # A tied GPT-2 state dict (pickle) works the same way.
    report = to_onnx(fx("gpt2-state-dict.bin"), tmp_path / "g", src_format="pytorch", dtype="keep", verify=True,
                     force=False, config=fx("gpt2-hf"))
    assert report.verification.passed and (tmp_path / "g" / "model.onnx").is_file()


def test_onnx_source_and_existing_destination_are_refused(exported, fx, tmp_path):
    folder, _ = exported("gpt2-hf")
    with pytest.raises(UsageError, match="already ONNX"):
        to_onnx(folder / "model.onnx", tmp_path / "x.onnx", src_format="onnx", dtype="keep", verify=True, force=False)
    (tmp_path / "taken.onnx").write_bytes(b"keep me")
    with pytest.raises(DestinationError, match="destination exists"):
        to_onnx(fx("gpt2-hf"), tmp_path / "taken.onnx", src_format="hf", dtype="keep", verify=True, force=False)
    assert (tmp_path / "taken.onnx").read_bytes() == b"keep me"


def test_failed_verification_leaves_nothing(fx, tmp_path):
    dst = tmp_path / "out" / "nan-onnx"
    with pytest.raises(NotEquivalent, match="outputs differ from PyTorch's: .*NaN.*nothing was written") as e:
        to_onnx(fx("llama-hf-nan"), dst, src_format="hf", dtype="keep", verify=True, force=False)
    assert e.value.exit_code == 1
    assert not e.value.report.passed
    assert not (tmp_path / "out").exists()  # not even the folder made for it
    file_dst = tmp_path / "nan.onnx"
    with pytest.raises(NotEquivalent):
        to_onnx(fx("llama-hf-nan"), file_dst, src_format="hf", dtype="keep", verify=True, force=False)
    assert list(tmp_path.iterdir()) == []


def test_torch_onnx_fallback_for_an_architecture_optimum_does_not_know(fx, tmp_path):
    dst = tmp_path / "sc2"
    report = to_onnx(fx("starcoder2-hf"), dst, src_format="hf", dtype="keep", verify=True, force=False)
    assert report.extra["exporter"] == "torch.onnx" and report.extra["task"] == "text-generation"
    assert report.verification.passed and [c.name for c in report.verification.checks] == [
        "logits", "decode.prefill", "decode.steps", "generation"]
    assert report.verification.checks[0].figures["max_abs"] < 5e-6
    assert any("exported with torch.onnx" in n for n in report.notes)
    assert json.loads((dst / "config.json").read_text())["model_type"] == "starcoder2"
    with pytest.raises(Unsupported, match="use --task text-generation"):
        to_onnx(fx("starcoder2-hf"), tmp_path / "sc2b", src_format="hf", dtype="keep", verify=True, force=False,
                task="text-generation-with-past")


def test_exporting_twice_gives_byte_identical_files(exported, fx, tmp_path):
    """The contract's determinism holds for graphs too: the same folder and flags give the same bytes."""
    first, _ = exported("llama-hf")
    again = tmp_path / "again"
    to_onnx(fx("llama-hf"), again, src_format="hf", dtype="keep", verify=False, force=False)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


def test_sliding_window_model_is_verified_on_the_positions_both_caches_keep(fx, tmp_path):
    """transformers keeps only the last window-1 keys/values of a sliding-window layer; the ONNX graph
    returns all of them. The export is right (logits agree): the shared positions must agree too."""
    import shutil

    src = tmp_path / "mistral-sw"
    shutil.copytree(fx("mistral-hf"), src)
    config = json.loads((src / "config.json").read_text())
    config["sliding_window"] = 8
    (src / "config.json").write_text(json.dumps(config))
    report = to_onnx(src, tmp_path / "out", src_format="hf", dtype="keep", verify=True, force=False)
    v = report.verification
    assert v.passed, v.summary()
    assert any(n.startswith("sliding window 8: the PyTorch cache keeps only the last 7 positions") for n in v.notes)
    assert all(c.figures["max_abs"] < 5e-6 for c in v.checks if c.name != "generation")


def test_a_task_whose_head_the_checkpoint_lacks_is_refused_not_compared(fx, tmp_path):
    """A bare encoder has no masked-LM head: exported for fill-mask, the head would be random on both
    sides (and different): exit 2 saying so, not a misleading 'outputs differ'."""
    with pytest.raises(UsageError, match=r"bert-hf: the checkpoint has no weights for \d+ tensors that "
                                         r"AutoModelForMaskedLM \(fill-mask\) needs \(cls\.predictions"):
        to_onnx(fx("bert-hf"), tmp_path / "fm", src_format="hf", dtype="keep", verify=True, force=False,
                task="fill-mask")
    assert not (tmp_path / "fm").exists()


def test_fill_mask_export_of_a_masked_lm_is_verified_with_its_head(fx, tmp_path):
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(fx("bert-hf"))
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (fx("bert-hf") / name).exists():
            (tmp_path / "mlm" / name).write_bytes((fx("bert-hf") / name).read_bytes())
    report = to_onnx(tmp_path / "mlm", tmp_path / "out", src_format="hf", dtype="keep", verify=True, force=False)
    assert report.extra["task"] == "fill-mask" and report.verification.passed
    assert [c.name for c in report.verification.checks] == ["logits"]


def test_force_over_an_external_data_export_removes_its_old_data_file(fx, tmp_path):
    dst = tmp_path / "m.onnx"
    to_onnx(fx("gpt2-hf"), dst, src_format="hf", dtype="keep", verify=False, force=False, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx_data"]
    to_onnx(fx("gpt2-hf"), dst, src_format="hf", dtype="keep", verify=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    onnx.checker.check_model(str(dst))
