"""`llmconv verify` in weights mode: verdicts, exit codes, the table, --json and --junit."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


@pytest.fixture
def llama(fx) -> Path:
    return fx("llama.safetensors")


def variant(llama: Path, tmp_path: Path, name: str, change) -> Path:
    tensors = {k: v.clone() for k, v in load_file(llama).items()}
    change(tensors)
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path)
    return path


def perturb(tensors, name="model.norm.weight", index=7, delta=0.5):
    tensors[name][index] += delta


def verify_json(cli, *args) -> tuple[int, dict]:
    r = cli("verify", *args, "--json")
    return r.exit_code, json.loads(r.stdout)


def test_identical_models_exit_0(cli, fx, llama, tmp_path):
    converted = tmp_path / "llama.bin"
    assert cli("convert", llama, converted, "-q").exit_code == 0
    r = cli("verify", llama, converted)
    assert r.exit_code == 0
    assert "EQUIVALENT: all 21 checks passed" in r.stdout and r.stderr == ""
    assert "weights · profile exact · 21 checks, 21 bit-exact" in r.stdout
    code, out = verify_json(cli, llama, converted)
    assert code == 0 and out["ok"] is True and out["mode"] == "weights" and out["profile"] == "exact"
    assert all(c["equal"] and c["max_abs"] == 0.0 for c in out["checks"])


def test_perturbed_element_fails_with_name_and_max_abs(cli, llama, tmp_path):
    cand = variant(llama, tmp_path, "pert", perturb)
    code, out = verify_json(cli, llama, cand)
    assert code == 1
    assert out["schema"] == "llmconv.verify/1" and out["ok"] is False
    assert out["reference"] == str(llama) and out["candidate"] == str(cand)
    worst = out["checks"][0]
    assert worst["name"] == "model.norm.weight" and worst["passed"] is False and worst["equal"] is False
    assert worst["max_abs"] == pytest.approx(0.5, abs=1e-6)
    assert worst["shape"] == [64] and worst["reference_dtype"] == worst["candidate_dtype"] == "float32"
    assert sum(not c["passed"] for c in out["checks"]) == 1 and len(out["checks"]) == 21
    assert out["missing"] == [] and out["unexpected"] == []


def test_within_atol_passes_beyond_fails(cli, llama, tmp_path):
    cand = variant(llama, tmp_path, "pert", perturb)
    assert cli("verify", llama, cand, "--atol", "0.6").exit_code == 0
    code, out = verify_json(cli, llama, cand, "--atol", "0.4")
    assert code == 1 and "beyond atol 0.4" in out["checks"][0]["reason"]
    assert cli("verify", llama, cand, "--rtol", "0.01").exit_code == 1


def test_table_lists_failing_tensors_worst_first(cli, llama, tmp_path):
    def two(tensors):
        perturb(tensors, "model.norm.weight", 1, 0.5)
        perturb(tensors, "model.layers.0.input_layernorm.weight", 2, 2.0)

    cand = variant(llama, tmp_path, "two", two)
    r = cli("verify", llama, cand, env={"COLUMNS": "200"})
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    rows = [ln for ln in lines if "FAIL" in ln and ln.startswith("│")]
    assert len(rows) == 2
    assert "model.layers.0.input_layernorm.weight" in rows[0] and "model.norm.weight" in rows[1]
    reasons = [ln for ln in lines if ln.startswith("FAIL ")]
    assert reasons == ["FAIL model.layers.0.input_layernorm.weight: not bit-exact (max abs diff 2)",
                       "FAIL model.norm.weight: not bit-exact (max abs diff 0.5)"]
    assert "2 failing of 21 checks" in r.stdout
    assert "NOT EQUIVALENT: 2 of 21 checks failed (first: model.layers.0.input_layernorm.weight" in r.stdout
    assert "lm_head.weight" not in r.stdout  # passing tensors are not listed when some fail


def test_renamed_tensor_is_missing_and_unexpected(cli, llama, tmp_path):
    cand = variant(llama, tmp_path, "renamed", lambda t: t.__setitem__("model.final_norm.weight",
                                                                         t.pop("model.norm.weight")))
    code, out = verify_json(cli, llama, cand)
    assert code == 1
    assert out["missing"] == ["model.norm.weight"] and out["unexpected"] == ["model.final_norm.weight"]
    assert all(c["passed"] for c in out["checks"]) and len(out["checks"]) == 20
    r = cli("verify", llama, cand)
    assert "missing in candidate (1): model.norm.weight" in r.stdout
    assert "unexpected in candidate (1): model.final_norm.weight" in r.stdout


def test_dtype_change_fails_exact_passes_with_profile_or_atol(cli, llama, tmp_path):
    half = variant(llama, tmp_path, "half", lambda t: t.update({k: v.half() for k, v in t.items()}))
    code, out = verify_json(cli, llama, half)
    assert code == 1 and all(not c["passed"] for c in out["checks"])
    assert out["checks"][0]["candidate_dtype"] == "float16" and "dtype float16 != reference float32" in \
        out["checks"][0]["reason"]
    code, out = verify_json(cli, llama, half, "--profile", "fp16")
    assert code == 0 and out["profile"] == "fp16" and out["checks"][0]["atol"] == 1e-3
    r = cli("verify", llama, half, "--atol", "1e-3")
    assert r.exit_code == 0 and "21 checks, all within tolerance (0 bit-exact)" in r.stdout
    assert cli("verify", llama, half, "--atol", "1e-7").exit_code == 1


def test_tolerances_are_checked_and_named_in_the_report(cli, llama, tmp_path):
    cand = variant(llama, tmp_path, "pert", perturb)
    r = cli("verify", llama, cand, "--atol", "-1")
    assert r.exit_code == 2 and "--atol must be >= 0, not -1.0" in r.stderr
    code, out = verify_json(cli, llama, cand, "--atol", "0.6")
    assert code == 0 and out["profile"] == "custom" and out["thresholds"] == {"atol": 0.6, "rtol": 0.0}


def test_a_shape_mismatch_is_listed_before_value_differences(cli, llama, tmp_path):
    def both(tensors):
        perturb(tensors, "model.norm.weight", 1, 0.5)
        tensors["model.layers.1.input_layernorm.weight"] = tensors["model.layers.1.input_layernorm.weight"][:32]

    code, out = verify_json(cli, llama, variant(llama, tmp_path, "both", both))
    assert code == 1
    assert [c["name"] for c in out["checks"][:2]] == ["model.layers.1.input_layernorm.weight", "model.norm.weight"]


def test_shape_change_fails(cli, llama, tmp_path):
    cand = variant(llama, tmp_path, "shape", lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:32]))
    code, out = verify_json(cli, llama, cand, "--atol", "100")
    assert code == 1
    bad = out["checks"][0]
    assert bad["name"] == "model.norm.weight" and bad["candidate_shape"] == [32] and bad["shape"] == [64]


def test_nan_handling(cli, tmp_path):
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    save_file({"x": torch.tensor([1.0, float("nan"), 3.0])}, a)
    save_file({"x": torch.tensor([1.0, float("nan"), 3.0])}, b)
    save_file({"x": torch.tensor([1.0, 2.0, float("nan")])}, c)
    assert cli("verify", a, b).exit_code == 0
    r = cli("verify", a, c, "--json", "--atol", "100")
    assert r.exit_code == 1
    out = json.loads(r.stdout, parse_constant=_refuse)  # strict JSON: no bare NaN/Infinity
    check = out["checks"][0]
    assert check["nan_mismatch"] == 2 and check["max_abs"] == "inf"
    assert check["reason"] == "NaN in 2 places where the other side has a number"


def _refuse(constant: str):
    raise AssertionError(f"{constant} is not JSON")


def test_junit_report(cli, llama, tmp_path):
    cand = variant(llama, tmp_path, "pert", perturb)
    xml_path = tmp_path / "reports" / "verify.xml"
    r = cli("verify", llama, cand, "--junit", xml_path, "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["ok"] is False
    suite = ET.parse(xml_path).getroot().find("testsuite")
    assert suite.get("name") == "llmconv.verify.weights"
    assert suite.get("tests") == "21" and suite.get("failures") == "1" and suite.get("errors") == "0"
    cases = suite.findall("testcase")
    assert len(cases) == 21
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["model.norm.weight"]
    assert "max_abs=0.5" in failed[0].find("failure").get("message")
    ok = cli("verify", llama, llama, "--junit", xml_path)
    assert ok.exit_code == 0
    assert ET.parse(xml_path).getroot().find("testsuite").get("failures") == "0"


def test_junit_never_replaces_a_folder_or_a_model_and_records_errors(cli, fx, llama, tmp_path):
    import shutil

    folder = tmp_path / "llama-hf"
    shutil.copytree(fx("llama-hf"), folder)
    r = cli("verify", folder, fx("llama-hf-sharded"), "--junit", folder)
    assert r.exit_code == 2 and "--junit names a folder" in r.stderr
    assert (folder / "config.json").is_file()  # the model folder is still there
    copy = tmp_path / "llama.safetensors"
    shutil.copy(llama, copy)
    r = cli("verify", llama, copy, "--junit", copy)
    assert r.exit_code == 2 and "--junit names one of the models being compared" in r.stderr
    assert copy.read_bytes() == llama.read_bytes()
    # A run that cannot compare (exit 2) replaces an earlier report with an error case.
    xml_path = tmp_path / "verify.xml"
    assert cli("verify", llama, llama, "--junit", xml_path).exit_code == 0
    r = cli("verify", llama, fx("truncated-data.safetensors"), "--junit", xml_path)
    assert r.exit_code == 2
    suite = ET.parse(xml_path).getroot().find("testsuite")
    assert suite.get("errors") == "1" and suite.get("tests") == "1"
    assert "truncated-data.safetensors" in suite.find("testcase/error").get("message")


def test_verify_bad_inputs_exit_2(cli, fx, llama, tmp_path):
    r = cli("verify", llama, fx("truncated-data.safetensors"))
    assert r.exit_code == 2 and "truncated-data.safetensors" in r.stderr and "Traceback" not in r.stderr
    r = cli("verify", llama, tmp_path / "nope")
    assert r.exit_code == 2 and f"{tmp_path / 'nope'}: no such file or folder" in r.stderr
    r = cli("verify", llama, llama, "--profile", "fp8")
    assert r.exit_code == 2 and "unknown --profile 'fp8'" in r.stderr
    r = cli("verify", llama, llama, "--mode", "weights", "--profile", "int8", "--json")
    assert r.exit_code == 2
    assert json.loads(r.stdout)["error"]["code"] == 2


def test_verify_across_formats_and_ties(cli, fx):
    r = cli("verify", fx("gpt2-state-dict.bin"), fx("gpt2-hf"), "--json")
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    assert out["tied"] == ["lm_head.weight"] and len(out["checks"]) == 28


def test_junit_stays_well_formed_when_names_hold_control_characters(cli, fx, tmp_path):
    """ElementTree writes ESC and BEL raw, and XML forbids them: every reader refused the whole report."""
    report = tmp_path / "r.xml"
    r = cli("verify", fx("control-names.safetensors"), fx("control-names-changed.safetensors"), "--junit", report)
    assert r.exit_code == 1, r.stderr
    suite = ET.parse(report).getroot().find("testsuite")  # parses: no raw control characters left
    names = [tc.get("name") for tc in suite.iter("testcase")]
    assert any("\\x1b[" in n for n in names), names
    assert not any(ch in "".join(names) for ch in "\x1b\x07")


def test_quiet_prints_the_verdict_line_alone(cli, llama, tmp_path):
    r = cli("verify", llama, llama, "--quiet")
    assert r.exit_code == 0 and r.stdout == "EQUIVALENT: all 21 checks passed\n" and r.stderr == ""
    cand = variant(llama, tmp_path, "pert", perturb)
    r = cli("verify", llama, cand, "-q")
    assert r.exit_code == 1 and r.stdout.startswith("NOT EQUIVALENT: 1 of 21 checks failed") and r.stderr == ""
    assert len(r.stdout.splitlines()) == 1
