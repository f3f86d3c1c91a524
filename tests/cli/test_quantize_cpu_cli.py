"""`llmconv quantize --cpu` and the fallback through the CLI, and `llmconv env`."""

from __future__ import annotations

import json

import onnx
import pytest

from llmconv.transforms.cpu import detect_cpu
from tests.transforms import _models


@pytest.fixture(scope="module")
def outlier_head(fixtures_dir, fx, tmp_path_factory):
    from fixtures.outliers import with_outliers

    if not (_models.TRAINED / "config.json").is_file():
        pytest.skip("the trained fixture is not built")
    src = _models.exported(fixtures_dir, fx, "trained-gpt2")
    return with_outliers(src, tmp_path_factory.mktemp("outlier") / "m", ["/lm_head/MatMul"])


def test_fallback_in_human_output(cli, outlier_head, tmp_path):
    r = cli("quantize", outlier_head, tmp_path / "q.onnx", "--target", "cpu", env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    assert "attempts" in out and "1 node(s) kept in float32" in out  # on the closest setting, which is CPU's own
    assert out.count(" fail ") >= 2 and " pass " in out
    assert f"settings for {detect_cpu().isa}; verified on this CPU ({detect_cpu().isa}" in out
    assert "kept float32  1 node(s)" in out and "to cost the most accuracy: /lm_head/MatMul" in out


def test_fallback_json_and_exit_1_json(cli, outlier_head, tmp_path):
    r = cli("quantize", outlier_head, tmp_path / "q.onnx", "--target", "cpu", "--json")
    assert r.exit_code == 0, r.stderr
    js = json.loads(r.stdout)
    assert js["ok"] and js["attempts"][-1]["passed"] and js["attempts"][-1]["kept_float"] == ["/lm_head/MatMul"]
    assert all(set(a) >= {"setting", "passed", "summary", "figures", "seconds", "weight_type", "per_channel",
                          "reduce_range", "kept_float"} for a in js["attempts"])
    assert js["options"]["cpu"]["verified_on"] == "this CPU"
    # An explicit --method: one attempt, exit 1, the attempts in the error object's JSON, nothing written.
    dst = tmp_path / "forced.onnx"
    r = cli("quantize", outlier_head, dst, "--target", "cpu", "--method", "int8-dynamic", "--json")
    assert r.exit_code == 1
    js = json.loads(r.stdout)
    assert js["ok"] is False and js["error"]["code"] == 1 and len(js["attempts"]) == 1
    assert js["attempts"][0]["figures"]["logits"]["cosine"] < 0.99 and not dst.exists()


def test_every_attempt_is_shown_when_all_fail(cli, fixtures_dir, fx, tmp_path):
    from fixtures.outliers import with_outliers

    src = _models.exported(fixtures_dir, fx, "trained-gpt2")
    names = [n.name for n in onnx.load(str(src / "model.onnx")).graph.node
             if n.op_type in ("Gemm", "MatMul") and ("c_" in n.name or "lm_head" in n.name)]
    bad = with_outliers(src, tmp_path / "all", names)
    dst = tmp_path / "q.onnx"
    r = cli("quantize", bad, dst, "--target", "cpu", env={"COLUMNS": "200"})
    assert r.exit_code == 1 and not dst.exists()
    attempts = r.stderr.split("outputs · profile")[0]  # the table of attempts, above the closest one's checks
    assert "attempts" in attempts and attempts.count(" fail ") >= 3 and " pass " not in attempts
    assert "measuring" in r.stderr and "settings tried (closest: " in r.stderr
    r = cli("quantize", bad, dst, "--target", "cpu", "--json")
    js = json.loads(r.stdout)
    assert r.exit_code == 1 and js["verification"]["cpu"]["settings_for"] == detect_cpu().isa
    assert len(js["attempts"]) >= 3 and js["options"]["cpu"] == js["verification"]["cpu"]


def test_no_verify_does_not_say_verified(cli, outlier_head, tmp_path):
    r = cli("quantize", outlier_head, tmp_path / "q.onnx", "--target", "cpu", "--cpu", "avx2", "--no-verify",
            env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.stderr
    assert "settings for avx2; not verified (this CPU: " in r.stdout and "verified on this CPU" not in r.stdout
    assert "verification ran on this CPU" not in r.stdout


def test_cpu_option_usage_errors(cli, outlier_head, tmp_path):
    r = cli("quantize", outlier_head, tmp_path / "a.onnx", "--target", "gpu", "--cpu", "avx2")
    assert r.exit_code == 2 and "--cpu picks the int8 settings of --target cpu" in r.stderr
    r = cli("quantize", outlier_head, tmp_path / "a.onnx", "--target", "cpu", "--cpu", "avx3")
    assert r.exit_code == 2 and "unknown --cpu 'avx3'" in r.stderr
    assert not list(tmp_path.iterdir())


def test_cpu_option_for_another_cpu_is_said(cli, outlier_head, tmp_path):
    other = "avx2" if not detect_cpu().saturates else "avx512-vnni"
    dst = tmp_path / "q.onnx"
    r = cli("quantize", outlier_head, dst, "--target", "cpu", "--cpu", other, "--json")
    assert r.exit_code == 0, r.stderr
    js = json.loads(r.stdout)
    assert js["options"]["cpu"]["settings_for"] == other and js["options"]["cpu"]["chosen_by"] == "--cpu"
    assert any(f"--cpu {other}: the settings are for {other}, verification ran on this CPU" in n for n in js["notes"])
    assert js["attempts"][0]["reduce_range"] is (other == "avx2")
    assert onnx.load(str(dst)).graph.node


def test_env(cli):
    r = cli("env", "--json")
    assert r.exit_code == 0, r.stderr
    js = json.loads(r.stdout)
    cpu = detect_cpu()
    assert js["schema"] == "llmconv.env/1" and js["ok"] is True
    assert js["cpu"]["isa"] == cpu.isa and js["cpu"]["int8_saturates"] is cpu.saturates
    assert js["int8_rule"]["reduce_range"] is cpu.saturates and js["int8_rule"]["for"] == cpu.isa
    assert "CPUExecutionProvider" in js["execution_providers"]
    assert js["packages"]["onnxruntime"] and js["packages"]["torch"].startswith("2.13.0")
    r = cli("env", env={"COLUMNS": "120"})
    assert r.exit_code == 0 and "int8 rule" in r.stdout and cpu.isa in r.stdout
