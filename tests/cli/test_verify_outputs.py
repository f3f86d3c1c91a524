"""``llmconv verify`` in outputs mode through the CLI: exit codes, the table, --json, --junit, --text."""

from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from tests.export import _exports

CHECK_KEYS = ["name", "passed", "shape", "dtype", "max_abs", "mean_abs", "max_rel", "cosine", "top1_agreement",
              "top5_agreement", "kl", "nan", "inf", "atol", "rtol", "worst_index"]

DECODE_CHECKS = ["decode.prefill", "decode.steps", "decode.consistency",
                 "decode.cache", "generation"]


@pytest.fixture(scope="module")
def gpt2(fixtures_dir, fx):
    return fx("gpt2-hf"), _exports.export(fixtures_dir, fx, "gpt2-hf")[0]


def test_equivalent_table_and_exit_0(gpt2, cli):
    hf, onnx_dir = gpt2
    r = cli("verify", hf, onnx_dir / "model.onnx")
    assert r.exit_code == 0, r.output
    for text in ("outputs · profile fp32 · 11 checks", "logits", "present.1.value", "decode.steps", "decode.cache",
                 "weights", "generation: 4 prompts x 6 tokens, 4 identical, agreement 1 (min 1)",
                 "decode: prompts=4, prompt_lengths=[8, 6, 4, 2], left_padded=3, decode_steps=4",
                 "EQUIVALENT: all 11 checks passed",
                 "note: profile auto -> fp32 (candidate: float32)",
                 "runners: reference=torch (text-generation-with-past), candidate=onnxruntime"):
        assert text in r.stdout, text


def test_json_and_junit(gpt2, cli, tmp_path):
    hf, onnx_dir = gpt2
    junit = tmp_path / "verify.xml"
    r = cli("verify", hf, onnx_dir, "--json", "--junit", junit, "--batch", "1", "--seq-len", "9", "--samples", "3",
            "--seed", "5", "--profile", "fp32")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.verify/1" and out["ok"] is True and out["mode"] == "outputs"
    assert out["profile"] == "fp32" and out["reference"] == str(hf) and out["candidate"] == str(onnx_dir)
    assert out["inputs"] == {"batch": 1, "seq_len": 9, "samples": 4, "seed": 5, "shapes": [[1, 9], [1, 5], [1, 1]]}
    assert [c["name"] for c in out["checks"]][:2] == ["logits", "present.0.key"]
    assert all(list(c) == CHECK_KEYS for c in out["checks"][:5])
    # Then the graph's weights against the checkpoint's, tensor by tensor (its name record): bit-exact.
    assert [c["name"] for c in out["checks"][5:]] == [*DECODE_CHECKS, "weights"]
    assert out["checks"][-1]["equal"] is True and out["checks"][-1]["tensors"] == 28
    gen = out["checks"][-2]
    assert gen["prompts"] == 4 and gen["new_tokens"] == 6 and gen["identical"] == 4 and gen["agreement"] == 1.0
    assert [p["first_divergence"] for p in gen["per_prompt"]] == [None] * 4
    assert out["decode"]["prompt_lengths"] == [8, 6, 4, 2]  # at most 8 tokens
    assert out["checks"][0]["shape"] == [1, 9, 1024]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "11" and suite.get("failures") == "0"
    gen_case = suite.findall("testcase")[-2]
    assert gen_case.get("name") == "generation" and "prompt 3: identical, agreement 1.000" in gen_case.find(
        "system-out").text
    assert [tc.get("name") for tc in suite.findall("testcase")][0] == "logits"


def test_not_equivalent_exit_1(gpt2, fx, cli, tmp_path):
    _, onnx_dir = gpt2
    broken = _exports.edit_initializers(onnx_dir, tmp_path / "broken",
                                        lambda a: a["transformer.h.0.ln_1.weight"].__setitem__(7, 1.5))
    junit = tmp_path / "fail.xml"
    r = cli("verify", fx("gpt2-hf"), broken, "--json", "--junit", junit)
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["checks"][0]["passed"] is False
    assert "beyond atol 0.0001" in out["checks"][0]["reason"]
    failure = ET.parse(junit).getroot().find("testsuite/testcase/failure")
    assert failure is not None and "max_abs=" in failure.get("message")
    r = cli("verify", fx("gpt2-hf"), broken)
    # The outputs, and the weights check, which names the changed initializer.
    assert r.exit_code == 1 and "NOT EQUIVALENT: 9 of 11 checks failed (first: logits:" in r.stdout
    assert "worst transformer.h.0.ln_1.weight (initializer 'transformer.h.0.ln_1.weight')" in r.stdout
    assert "rerun verify with --localize" in r.stdout


def test_text_perplexity_and_budget_flag(gpt2, cli, tmp_path):
    hf, onnx_dir = gpt2
    rng = random.Random(1)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{rng.randrange(1000)}" for _ in range(200)), encoding="utf-8")
    r = cli("verify", hf, onnx_dir, "--text", text, "--max-ppl-increase", "0.03", "--json")
    assert r.exit_code == 0, r.output
    ppl = next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "perplexity")
    assert ppl["name"] == "perplexity" and ppl["passed"] is True and ppl["budget"] == 0.03
    # 200 words, 200 tokens, windows of 128 positions: 127 + 71 tokens are predicted.
    assert ppl["reference_ppl"] > 1 and abs(ppl["relative_change"]) < 1e-6 and ppl["tokens"] == 198
    r = cli("verify", hf, onnx_dir, "--text", text)
    assert r.exit_code == 0 and "perplexity: reference" in r.stdout and "(budget 0.10%, 198 tokens)" in r.stdout


def test_user_inputs_file(gpt2, cli, tmp_path):
    hf, onnx_dir = gpt2
    np.savez(tmp_path / "in.npz", input_ids=np.arange(12, dtype=np.int64).reshape(2, 6),
             attention_mask=np.array([[1] * 6, [1, 1, 1, 0, 0, 0]]))
    r = cli("verify", hf, onnx_dir, "--inputs", tmp_path / "in.npz", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["inputs"]["file"] == str(tmp_path / "in.npz")


@pytest.mark.parametrize(("args", "message"), [
    (["--seq-len", "500"], ": --seq-len 500 needs 500 positions but the model has 128 (use --seq-len 128 or less)"),
    (["--profile", "fp64"], "unknown --profile 'fp64'"),
    (["--provider", "tpu"], "unknown --provider 'tpu'"),
])
def test_bad_usage_exit_2(gpt2, cli, args, message):
    hf, onnx_dir = gpt2
    r = cli("verify", hf, onnx_dir, *args)
    assert r.exit_code == 2
    assert message in r.stderr and "Traceback" not in r.output


def test_unsafe_external_data_exit_2(fx, cli):
    r = cli("verify", fx("onnx-external-data"), fx("onnx-external-escape"), "--json")
    assert r.exit_code == 2
    err = json.loads(r.stdout)["error"]
    assert err["code"] == 2 and "leaves the model's folder" in err["message"]
