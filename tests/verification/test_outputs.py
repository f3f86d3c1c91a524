"""Outputs mode end to end: legitimate pairs pass, broken models fail, figures and perplexity are right."""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmconv.errors import Unsupported, UsageError
from llmconv.verification.outputs import compare_outputs
from tests.export._exports import by_shape, edit_initializers

CHECK_KEYS = ["name", "passed", "shape", "dtype", "max_abs", "mean_abs", "max_rel", "cosine", "top1_agreement",
              "top5_agreement", "kl", "nan", "inf", "atol", "rtol", "worst_index"]

DECODE_CHECKS = ["decode.prefill", "decode.steps", "decode.consistency",
                 "decode.cache", "generation"]


@pytest.fixture(scope="module")
def llama(exported, fx):
    """(hf folder, ONNX folder with past, ONNX folder without past) of the tiny Llama."""
    return fx("llama-hf"), exported("llama-hf")[0], exported("llama-hf", "text-generation")[0]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(f"w{rng.randrange(1000)}" for _ in range(300)) + "\n", encoding="utf-8")
    return path


def test_any_pair_of_runners(llama):
    hf, with_past, no_past = llama
    r = compare_outputs(with_past, no_past)  # ONNX vs ONNX: the logits they share
    assert r.passed and [c.name for c in r.checks] == ["logits", "decode.prefill", "decode.steps", "generation"]
    assert any("outputs only the reference has (not compared): present.0.key" in n for n in r.notes)
    r = compare_outputs(hf, hf, profile="exact")  # hf vs hf in PyTorch, caches included
    assert r.passed and r.profile == "exact" and len(r.checks) == 10
    # The same model on both sides: bit-exact, but for its cached steps against its own pass without a cache.
    assert all(c.figures["max_abs"] == 0.0 for c in r.checks if c.name not in ("generation", "decode.consistency"))
    consistency = next(c for c in r.checks if c.name == "decode.consistency")
    assert consistency.passed and consistency.figures["max_abs"] < 1e-5
    r = compare_outputs(no_past, hf)  # ONNX reference, hf candidate
    assert r.passed and r.extra["runners"] == {"reference": "onnxruntime (CPUExecutionProvider, text-generation)",
                                               "candidate": "torch (text-generation)"}


def test_report_matches_the_contract(llama):
    hf, with_past, _ = llama
    r = compare_outputs(hf, with_past, batch=3, seq_len=12, samples=3, seed=7)
    out = r.to_json()
    assert out["schema"] == "llmconv.verify/1" and out["mode"] == "outputs" and out["profile"] == "fp32"
    # three samples of --batch rows, then one of one row and one token
    assert out["inputs"] == {"batch": 3, "seq_len": 12, "samples": 4, "seed": 7, "shapes": [[3, 12], [3, 6], [1, 1]]}
    for c in out["checks"][:5]:  # the forward outputs; the decode checks add their own figures
        assert list(c) == CHECK_KEYS, list(c)
    assert [c["name"] for c in out["checks"][5:]] == DECODE_CHECKS
    assert list(out["checks"][5])[:len(CHECK_KEYS)] == CHECK_KEYS
    logits = out["checks"][0]
    assert logits["name"] == "logits" and logits["shape"] == [3, 12, 1024] and logits["dtype"] == "float32"
    assert logits["top1_agreement"] == 1.0 and logits["top5_agreement"] == 1.0 and 0 <= logits["kl"] < 1e-9
    assert logits["atol"] == 1e-4 and logits["rtol"] == 1e-4 and logits["nan"] == 0 and logits["inf"] == 0
    assert len(logits["worst_index"]) == 3 and all(0 <= i < d for i, d in zip(logits["worst_index"], [3, 12, 1024],
                                                                              strict=True))
    present = out["checks"][1]
    assert present["name"] == "present.0.key" and present["shape"] == [3, 2, 12, 16]
    assert present["top1_agreement"] is None and present["kl"] is None and present["cosine"] > 0.99999


@pytest.mark.parametrize(("fixture", "expect"), [
    ("llama-hf-perturbed", "beyond atol 0.0001"),         # one lm_head element + 1e-3
    ("llama-hf-swapped-rows", "beyond atol 0.0001"),      # two rows of a q_proj swapped
    ("llama-hf-transposed", "beyond atol 0.0001"),        # a square q_proj transposed
    ("llama-hf-nan", "NaN in the candidate's output"),    # NaN in the final norm
])
def test_broken_candidates_fail(llama, fx, fixture, expect):
    _, with_past, _ = llama
    r = compare_outputs(with_past, fx(fixture), profile="fp32")
    assert not r.passed
    logits = r.checks[0]
    assert logits.name == "logits" and not logits.passed and expect in logits.reason
    if fixture == "llama-hf-perturbed":
        # The changed element is lm_head[100, 3]: the worst logit is token 100.
        assert logits.figures["worst_index"][2] == 100
        assert 1e-4 < logits.figures["max_abs"] < 1e-2
        # The caches do not see the head; every logits check does.
        kept = ("present" in c.name or c.name in ("decode.cache", "decode.consistency") for c in r.checks[1:-1])
        assert all(c.passed == k for c, k in zip(r.checks[1:-1], kept, strict=True)), r.summary()
    if fixture == "llama-hf-nan":
        assert logits.figures["nan"] == 2 * 16 * 1024 + 2 * 8 * 1024 + 1 * 1 * 1024  # and the one-token sample


def test_dropped_layer_exported_unverified_fails(fixtures_dir, fx, llama):
    from tests.export._exports import export

    hf, _, _ = llama
    candidate, report = export(fixtures_dir, fx, "llama-hf-dropped-layer", verify=False)
    assert report.verification is None
    r = compare_outputs(hf, candidate)
    assert not r.passed
    by_name = {c.name: c for c in r.checks}
    assert not by_name["logits"].passed and "beyond atol" in by_name["logits"].reason
    assert by_name["present.0.key"].passed  # layer 0 is untouched
    assert "present.1.key" not in by_name
    assert any("outputs only the reference has (not compared): present.1.key" in n for n in r.notes)


def test_onnx_level_edits_fail(llama, tmp_path):
    hf, with_past, _ = llama

    def perturb(a):
        a[by_shape(a, (64, 1024))][3, 100] += np.float32(1e-3)

    def nan(a):
        a["model.layers.0.input_layernorm.weight"][5] = np.nan

    r = compare_outputs(hf, edit_initializers(with_past, tmp_path / "perturbed", perturb), profile="fp32")
    assert not r.passed and r.checks[0].figures["worst_index"][2] == 100
    r = compare_outputs(hf, edit_initializers(with_past, tmp_path / "nan", nan))
    assert not r.passed and all(c.figures["nan"] > 0 for c in r.checks[:1])


def test_tolerance_overrides(llama):
    hf, with_past, _ = llama
    r = compare_outputs(hf, with_past, atol=0.0, rtol=0.0)
    # Two runtimes never agree to the last bit on every element.
    assert not r.passed and "beyond atol 0 + rtol 0" in r.checks[0].reason
    assert r.checks[0].figures["atol"] == 0.0
    r = compare_outputs(hf, with_past, atol=1e-3)
    assert r.passed and r.checks[0].figures["atol"] == 1e-3 and r.checks[0].figures["rtol"] == 1e-4


def test_lossy_profiles_use_agreement_not_elementwise(llama, fx):
    hf, with_past, _ = llama
    r = compare_outputs(with_past, fx("llama-hf-perturbed"), profile="int8")
    assert r.passed and r.profile == "int8"  # a 1e-3 change is far inside int8's budget
    assert r.checks[0].figures["atol"] is None
    assert r.extra["thresholds"]["min_top1"] == 0.90 and r.extra["thresholds"]["max_ppl_increase"] == 0.02
    r = compare_outputs(with_past, fx("llama-hf-transposed"), profile="int4")
    assert r.profile == "int4" and r.checks[0].figures["top1_agreement"] is not None


def test_auto_profile_follows_the_candidate(llama, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    hf, with_past, _ = llama
    q8 = tmp_path / "q8"
    shutil.copytree(with_past, q8)
    quantize_dynamic(str(with_past / "model.onnx"), str(q8 / "model.onnx"), weight_type=QuantType.QInt8)
    r = compare_outputs(hf, q8)
    assert r.profile == "int8" and "profile auto -> int8 (candidate: int8)" in r.notes
    fig = r.checks[0].figures
    assert 0.9 < fig["cosine"] < 1.0 and fig["max_abs"] > 1e-3  # lossy, and measured as such
    r = compare_outputs(hf, with_past)
    assert r.profile == "fp32"


def test_auto_profile_for_a_half_precision_hf_folder(llama, tmp_path):
    from llmconv.conversion import convert

    hf, _, _ = llama
    half = tmp_path / "llama-fp16"
    convert(hf, half, dtype="fp16")
    r = compare_outputs(hf, half)  # both run in PyTorch (float32): the fp16 rounding is what differs
    assert r.profile == "fp16" and "profile auto -> fp16 (candidate: float16)" in r.notes
    assert r.passed, r.summary()
    assert 1e-5 < r.checks[0].figures["max_abs"] < 1e-2  # fp16 rounding of the weights, measured
    assert r.checks[0].figures["atol"] is None and r.extra["thresholds"]["min_cosine"] == 0.999


def test_perplexity(llama, text_file):
    hf, with_past, _ = llama
    r = compare_outputs(hf, with_past, text=text_file)
    ppl = r.checks[-1]
    assert ppl.name == "perplexity" and ppl.passed
    assert set(ppl.figures) == {"reference_ppl", "candidate_ppl", "relative_change", "budget", "tokens"}
    assert ppl.figures["budget"] == 0.001 and abs(ppl.figures["relative_change"]) < 1e-6
    # The same figure computed directly with transformers' loss, in windows of 128 positions.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(hf)(text_file.read_text())["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    total = count = 0
    for s in range(0, len(ids), 128):
        chunk = torch.tensor([ids[s:s + 128]])
        if chunk.shape[1] > 1:
            with torch.no_grad():
                total += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    assert ppl.figures["tokens"] == count
    assert math.isclose(ppl.figures["reference_ppl"], math.exp(total / count), rel_tol=1e-5)


def test_perplexity_budget_catches_what_agreement_does_not(llama, text_file, tmp_path):
    hf, with_past, _ = llama

    def sharpen(a):
        a[by_shape(a, (64, 1024))] *= np.float32(2.0)  # logits x2: same ranking, different distribution

    candidate = edit_initializers(with_past, tmp_path / "sharp", sharpen)
    r = compare_outputs(hf, candidate, profile="int8", text=text_file)
    by_name = {c.name: c for c in r.checks}
    assert by_name["logits"].passed and by_name["logits"].figures["top1_agreement"] == 1.0
    ppl = by_name["perplexity"]
    assert not ppl.passed and ppl.figures["relative_change"] > 0.02 and "budget 2.00%" in ppl.reason
    r = compare_outputs(hf, candidate, profile="int8", text=text_file, max_ppl_increase=0.5)
    assert r.passed and r.checks[-1].figures["budget"] == 0.5


def test_perplexity_needs_a_causal_lm_and_a_tokenizer(exported, fx, llama, text_file, tmp_path):
    bert_onnx, _ = exported("bert-hf")
    with pytest.raises(UsageError, match="needs a causal language model; this one is feature-extraction"):
        compare_outputs(fx("bert-hf"), bert_onnx, text=text_file)
    hf, with_past, _ = llama
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(with_past / "model.onnx", bare / "model.onnx")
    shutil.copyfile(with_past / "config.json", bare / "config.json")
    r = compare_outputs(hf, bare, text=text_file)
    assert r.passed and any("the candidate has no tokenizer files" in n for n in r.notes)
    shutil.copyfile(bare / "model.onnx", tmp_path / "alone.onnx")
    with pytest.raises(UsageError, match="neither model's folder has tokenizer files"):
        compare_outputs(tmp_path / "alone.onnx", bare, text=text_file)


def test_user_inputs(llama, tmp_path):
    hf, with_past, _ = llama
    ids = np.array([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]], dtype=np.int64)
    np.savez(tmp_path / "in.npz", input_ids=ids)
    r = compare_outputs(hf, with_past, inputs=tmp_path / "in.npz")
    # The user's batch, then its first row's first token alone (every verification tries one row, one token).
    assert r.passed and r.inputs == {"batch": 2, "seq_len": 5, "samples": 2, "seed": None,
                                     "file": str(tmp_path / "in.npz"), "shapes": [[2, 5], [1, 1]]}
    assert r.checks[0].figures["shape"] == [2, 5, 1024]
    np.savez(tmp_path / "bad.npz", input_ids=ids + 5000)
    with pytest.raises(UsageError, match=r"ids outside the vocabulary \[0, 1024\)"):
        compare_outputs(hf, with_past, inputs=tmp_path / "bad.npz")


def test_usage_errors(exported, llama, fx):
    hf, with_past, _ = llama
    with pytest.raises(UsageError, match="needs 200 positions but the model has 128"):
        compare_outputs(hf, with_past, seq_len=200)
    with pytest.raises(UsageError, match="the two models share no output"):
        compare_outputs(exported("bert-hf")[0], with_past)
    with pytest.raises(UsageError, match="this is a bare safetensors weights file"):
        compare_outputs(fx("llama.safetensors"), with_past)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(Unsupported, match="no CUDA execution provider"):
            compare_outputs(hf, with_past, provider="cuda")
    with pytest.raises(UsageError, match="unknown --profile 'fp8'"):
        compare_outputs(hf, with_past, profile="fp8")
