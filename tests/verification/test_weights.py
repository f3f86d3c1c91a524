"""Weights mode: tensor-by-tensor comparison, the report as a value, JSON and JUnit renderings."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmconv.checkpoint import TensorInfo, TensorSource
from llmconv.errors import InputError, UsageError
from llmconv.verification.api import choose_mode, verify
from llmconv.verification.junit import write_junit
from llmconv.verification.report import VERIFY_SCHEMA
from llmconv.verification.weights import compare_tensor, compare_weights


def source(tensors: dict[str, torch.Tensor], aliases: dict[str, str] | None = None, path: str = "mem") -> TensorSource:
    infos = {n: TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    return TensorSource(format="test", path=Path(path), infos=infos, loader=lambda n: tensors[n],
                        aliases=aliases or {})


def test_identical_tensors_are_equal_bit_for_bit():
    t = torch.tensor([1.0, -0.0, float("nan"), float("inf")])
    c = compare_tensor("w", t, t.clone(), atol=None, rtol=None)
    assert c.passed and c.figures["equal"] is True and c.figures["max_abs"] == 0.0


def test_one_perturbed_element_fails_exact_with_its_max_abs():
    a = torch.zeros(1000)
    b = a.clone()
    b[517] = 0.25
    c = compare_tensor("w", a, b, atol=None, rtol=None)
    assert not c.passed and c.figures["max_abs"] == 0.25 and c.figures["equal"] is False
    assert c.reason == "not bit-exact (max abs diff 0.25)"
    assert compare_tensor("w", a, b, atol=0.3, rtol=None).passed
    within = compare_tensor("w", a, b, atol=0.2, rtol=None)
    assert not within.passed and "beyond atol 0.2" in within.reason
    assert compare_tensor("w", a + 1, b + 1, atol=None, rtol=0.25).passed  # |diff| 0.25 <= 0.25 * |1|


def test_signed_zero_is_a_different_bit_pattern():
    c = compare_tensor("z", torch.tensor([0.0]), torch.tensor([-0.0]), atol=None, rtol=None)
    assert not c.passed and c.figures["max_abs"] == 0.0
    assert compare_tensor("z", torch.tensor([0.0]), torch.tensor([-0.0]), atol=0.0, rtol=0.0).passed


def test_nan_handling():
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert compare_tensor("n", a, a.clone(), atol=None, rtol=None).passed
    moved = torch.tensor([1.0, 2.0, float("nan")])
    c = compare_tensor("n", a, moved, atol=10.0, rtol=None)
    assert not c.passed and c.figures["nan_mismatch"] == 2 and c.figures["max_abs"] == float("inf")
    assert c.reason == "NaN in 2 places where the other side has a number"
    # A NaN against a number is never within tolerance, however wide.
    assert not compare_tensor("n", torch.tensor([1.0]), torch.tensor([float("nan")]), atol=1e9, rtol=None).passed


def test_infinities_match_themselves_only():
    a = torch.tensor([float("inf"), -float("inf")])
    assert compare_tensor("i", a, a.clone(), atol=1e-3, rtol=None).passed
    c = compare_tensor("i", a, torch.tensor([float("inf"), 1.0]), atol=1e-3, rtol=None)
    assert not c.passed and c.figures["max_abs"] == float("inf")
    # rtol * |inf| is inf: a relative tolerance must still not accept a finite (or opposite) value for inf.
    for cand in ([float("inf"), 1.0], [-float("inf"), -float("inf")], [1.0, -float("inf")]):
        assert not compare_tensor("i", a, torch.tensor(cand), atol=1e-3, rtol=1e-3).passed, cand
    assert compare_tensor("i", a, a.clone(), atol=1e-3, rtol=1e-3).passed


def test_dtype_change_fails_exact_and_passes_within_tolerance():
    a = torch.tensor([0.1, 0.2, 1000.0])
    b = a.half()
    c = compare_tensor("d", a, b, atol=None, rtol=None)
    assert not c.passed and c.reason.startswith("dtype float16 != reference float32")
    assert c.figures["reference_dtype"] == "float32" and c.figures["candidate_dtype"] == "float16"
    assert 0 < c.figures["max_abs"] < 1e-4
    assert compare_tensor("d", a, b, atol=1e-3, rtol=1e-3).passed


def test_shape_change_fails_with_both_shapes():
    c = compare_tensor("s", torch.zeros(4, 2), torch.zeros(2, 4), atol=1.0, rtol=1.0)
    assert not c.passed and c.figures["candidate_shape"] == [2, 4] and c.figures["shape"] == [4, 2]
    assert c.reason == "shape [2, 4] != reference [4, 2]"


def test_bool_ints_bf16_empty_and_scalar_compare():
    for t in (torch.tensor([True, False]), torch.arange(5), torch.randn(3).bfloat16(), torch.zeros(0, 3),
              torch.tensor(2.5)):
        assert compare_tensor("t", t, t.clone(), atol=None, rtol=None).passed
    c = compare_tensor("b", torch.tensor([True, False]), torch.tensor([True, True]), atol=None, rtol=None)
    assert not c.passed and c.figures["max_abs"] == 1.0


def test_large_tensors_are_compared_in_chunks():
    a = torch.zeros((1 << 23) + 10)
    b = a.clone()
    b[-1] = 2.0
    c = compare_tensor("big", a, b, atol=None, rtol=None)
    assert not c.passed and c.figures["max_abs"] == 2.0


def test_compare_weights_missing_unexpected_tied_and_worst_first():
    w = torch.randn(4, 4)
    ref = source({"emb": w, "lm_head.weight": w, "a": torch.zeros(3), "b": torch.zeros(3), "gone": torch.ones(1)},
                 aliases={"lm_head.weight": "emb"})
    cand = source({"emb": w.clone(), "a": torch.tensor([0.0, 0.5, 0.0]), "b": torch.tensor([0.0, 0.0, 3.0]),
                   "new": torch.ones(1)})
    report = compare_weights(ref, cand)
    assert report.missing == ["gone"] and report.unexpected == ["new"] and report.tied == ["lm_head.weight"]
    assert [c.name for c in report.checks] == ["b", "a", "emb"]  # failing first, worst first
    assert [c.passed for c in report.checks] == [False, False, True]
    assert not report.passed
    assert report.summary() == ("2 of 3 checks failed (first: b: not bit-exact (max abs diff 3)); "
                                "1 missing in candidate (first: gone); 1 unexpected in candidate (first: new)")
    out = report.to_json()
    assert out["schema"] == VERIFY_SCHEMA and out["ok"] is False and out["mode"] == "weights"
    assert out["checks"][0] == {"name": "b", "passed": False, "shape": [3], "reference_dtype": "float32",
                                "candidate_dtype": "float32", "equal": False, "max_abs": 3.0,
                                "reason": "not bit-exact (max abs diff 3)"}
    assert out["missing"] == ["gone"] and out["unexpected"] == ["new"] and out["tied"] == ["lm_head.weight"]


def test_a_tied_head_counts_as_present_only_where_it_is_tied_again_on_load():
    w = torch.randn(4, 4)
    ref = source({"emb": w, "lm_head.weight": w, "other": w}, aliases={"lm_head.weight": "emb", "other": "emb"})
    untied = source({"emb": w.clone()})
    untied.config = {"model_type": "llama", "tie_word_embeddings": False}
    report = compare_weights(ref, untied)
    assert report.missing == ["lm_head.weight", "other"] and report.tied == [] and not report.passed
    tied = source({"emb": w.clone()})
    tied.config = {"model_type": "gpt2"}  # tie_word_embeddings left at its default: tied
    report = compare_weights(ref, tied)
    assert report.tied == ["lm_head.weight"] and report.missing == ["other"]  # nothing re-ties "other"


def test_nothing_to_compare_is_refused_not_passed():
    with pytest.raises(InputError, match="holds no tensors; nothing to compare"):
        compare_weights(source({}), source({}))
    with pytest.raises(InputError, match="holds no tensors"):
        compare_weights(source({"a": torch.zeros(1)}), source({}))


def test_junit_has_one_testcase_per_check_and_figures_in_failures(tmp_path):
    ref = source({"a": torch.zeros(3), "b": torch.zeros(2), "gone": torch.ones(1)})
    cand = source({"a": torch.tensor([0.0, 0.5, 0.0]), "b": torch.zeros(2), "new": torch.ones(1)})
    report = compare_weights(ref, cand)
    path = tmp_path / "reports" / "verify.xml"
    write_junit(report, path, seconds=1.5)
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "3" and suite.get("time") == "1.500"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {"a", "b", "gone", "new"}
    fail = cases["a"].find("failure")
    assert "not bit-exact" in fail.get("message") and "max_abs=0.5" in fail.get("message")
    assert cases["b"].find("failure") is None
    assert cases["gone"].find("failure").get("message") == "missing in candidate"
    assert "unexpected" in cases["new"].find("failure").get("message")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["profile"] == "exact"


def test_verify_api_on_files(fx, tmp_path):
    tensors = load_file(fx("llama.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].clone()
    tensors["model.norm.weight"][7] += 0.5
    cand = tmp_path / "cand.safetensors"
    save_file(tensors, cand)
    report = verify(fx("llama.safetensors"), cand)
    assert report.mode == "weights" and report.profile == "exact" and not report.passed
    assert report.failures()[0].name == "model.norm.weight"
    assert report.failures()[0].figures["max_abs"] == pytest.approx(0.5, abs=1e-6)
    assert verify(fx("llama.safetensors"), cand, atol=0.6).passed
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in load_file(fx("llama.safetensors")).items()}, half)
    assert not verify(fx("llama.safetensors"), half).passed
    fp16 = verify(fx("llama.safetensors"), half, profile="fp16")
    assert fp16.passed and fp16.profile == "fp16"
    assert fp16.checks[0].figures["atol"] == 1e-3 and fp16.checks[0].figures["rtol"] == 1e-3
    with pytest.raises(UsageError, match="unknown --profile 'fp8'"):
        verify(fx("llama.safetensors"), half, profile="fp8")
    with pytest.raises(UsageError, match="profile int8 compares model outputs"):
        verify(fx("llama.safetensors"), half, mode="weights", profile="int8")


def test_verify_across_formats_with_ties(fx):
    report = verify(fx("gpt2-state-dict.bin"), fx("gpt2-hf"))
    assert report.passed and report.tied == ["lm_head.weight"] and len(report.checks) == 28
    assert verify(fx("gpt2-hf"), fx("gpt2-hf-bin")).passed


def test_choose_mode():
    assert choose_mode("hf", "safetensors", mode="auto", wants_outputs=False) == "weights"
    assert choose_mode("hf", "onnx", mode="auto", wants_outputs=False) == "outputs"
    assert choose_mode("hf", "hf", mode="auto", wants_outputs=True) == "outputs"
    assert choose_mode("hf", "hf", mode="weights", wants_outputs=True) == "weights"
