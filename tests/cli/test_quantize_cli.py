"""`llmconv quantize` through the CLI: exit codes 0/1/2, --json per the contract, human output, help."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest

from tests import _lossy
from tests.transforms import _models


@pytest.fixture(scope="session")
def gpt2_onnx(fixtures_dir, fx):
    return _models.exported(fixtures_dir, fx, "gpt2-hf")


def test_quantize_json(cli, gpt2_onnx, tmp_path):
    dst = tmp_path / "q.onnx"
    r = cli("quantize", gpt2_onnx / "model.onnx", dst, "--target", "cpu", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.quantize/1" and out["ok"] is True
    assert out["method"] == "int8-dynamic" and out["target"] == "cpu" and out["profile"] == "int8"
    assert out["ops_quantized"] == {"Gemm": 8, "MatMul": 1} and out["linear_ops"] == 9
    assert out["size_after"] == dst.stat().st_size and 0 < out["size_ratio"] < 0.5
    assert out["files"] == [str(dst)] and out["verified"] is True
    assert out["verification"]["schema"] == "llmconv.verify/1" and out["verification"]["ok"] is True
    assert out["verification"]["checks"][0]["name"] == "logits"
    assert r.stderr == ""
    ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])


def test_quantize_human_output(cli, gpt2_onnx, tmp_path):
    r = cli("quantize", gpt2_onnx, tmp_path / "q4", "--target", "gpu", "--method", "int4", "--block-size", "64")
    assert r.exit_code == 0, r.stderr
    assert "quantized" in r.stdout and "int4 for gpu" in r.stdout
    assert "9 of 9 quantized (Gemm x8, MatMul x1)" in r.stdout
    assert "block size  64" in r.stdout and "rewrote 8 Gemm nodes as MatMul+Add" in r.stdout
    assert "x)" in r.stdout and "verified (outputs, profile int4)" in r.stdout
    assert (tmp_path / "q4" / "model.onnx").is_file() and (tmp_path / "q4" / "tokenizer.json").is_file()


def test_quantize_verification_failure_exits_1_and_writes_nothing(cli, gpt2_onnx, tmp_path):
    dst = tmp_path / "q.onnx"
    r = cli("quantize", gpt2_onnx, dst, "--target", "cpu", "--atol", "1e-7", "--rtol", "0", "--json")
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.quantize/1" and out["ok"] is False and out["error"]["code"] == 1
    assert "not within the int8 profile" in out["error"]["message"] and "nothing was written" in out["error"]["message"]
    assert out["verification"]["checks"][0]["passed"] is False  # the verification report travels with the error
    assert list(tmp_path.iterdir()) == []
    r = cli("quantize", gpt2_onnx, dst, "--target", "cpu", "--atol", "1e-7", "--rtol", "0")
    assert r.exit_code == 1 and "error:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "int8-dynamic"], "int8-dynamic quantizes an ONNX graph, and a bare safetensors weights file"),
    (["--method", "int4", "--block-size", "30"], "int4 quantizes an ONNX graph"),
    (["--calibration", "x.npz"], "--calibration does not apply to a fp16 cast of weights"),
    (["--block-size", "64"], "--block-size does not apply to a fp16 cast of weights"),
    (["--calibration-samples", "3"], "--calibration-samples does not apply to a fp16 cast of weights"),
    (["--no-verify", "--text", "x.txt"], "--text sets how the output is verified, and --no-verify skips"),
    (["--no-verify", "--atol", "0.1"], "--atol sets how the output is verified, and --no-verify skips"),
])
def test_quantize_usage_errors_exit_2_with_one_line(cli, fx, tmp_path, args, message):
    r = cli("quantize", fx("llama.safetensors"), tmp_path / "q.safetensors", "--target", "gpu", *args)
    assert r.exit_code == 2
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "int8-dynamic", "--block-size", "64"], "--block-size applies to --method int4, not int8-dynamic"),
    (["--method", "fp16", "--block-size", "32"], "--block-size applies to --method int4, not fp16"),
    (["--method", "int4", "--calibration-samples", "3"],
     "--calibration-samples applies to --method int8-static, not int4"),
])
def test_graph_options_of_another_method_are_refused(cli, gpt2_onnx, tmp_path, args, message):
    r = cli("quantize", gpt2_onnx, tmp_path / "q.onnx", "--target", "cpu", *args)
    assert r.exit_code == 2 and message in r.stderr and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_onnxruntime_errors_on_bad_calibration_values_print_one_line(gpt2_onnx, tmp_path):
    """onnxruntime logs its own errors from C++ straight to the terminal: only our line may reach it."""
    import subprocess
    import sys

    import numpy as np

    bad = tmp_path / "oov.npz"
    np.savez(bad, input_ids=np.full((2, 16), 5000, dtype=np.int64))  # the vocabulary has 1024 tokens
    r = subprocess.run([sys.executable, "-m", "llmconv", "quantize", str(gpt2_onnx), str(tmp_path / "s.onnx"),
                        "--target", "cpu", "--method", "int8-static", "--calibration", str(bad)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert not (tmp_path / "s.onnx").exists()


def test_quantize_needs_a_target(cli, gpt2_onnx, tmp_path):
    r = cli("quantize", gpt2_onnx, tmp_path / "q.onnx")
    assert r.exit_code == 2 and "--target" in r.stderr


def test_quantize_bad_target_and_op_types(cli, gpt2_onnx, tmp_path):
    r = cli("quantize", gpt2_onnx, tmp_path / "q.onnx", "--target", "npu")
    assert r.exit_code == 2 and "unknown --target 'npu' (use cpu or gpu)" in r.stderr
    r = cli("quantize", gpt2_onnx, tmp_path / "q.onnx", "--target", "cpu", "--op-types", "MatMul,Softmax")
    assert r.exit_code == 2 and "--op-types MatMul,Softmax: int8-dynamic quantizes Gather, Gemm, MatMul" in r.stderr


def test_quantize_weights_cast_json(cli, fx, tmp_path):
    r = cli("quantize", fx("gpt2-hf"), tmp_path / "bf", "--target", "cpu", "--method", "bf16", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["method"] == "bf16" and out["tensors_cast"] == 28 and out["verification"]["mode"] == "weights"
    assert out["verification"]["profile"] == "bf16" and out["options"]["overflow_check"] is True


def test_quantize_help_has_examples(cli):
    r = cli("quantize", "--help")
    assert r.exit_code == 0
    assert "llmconv quantize model.onnx model-int8.onnx --target cpu" in r.stdout
    assert "CUDA" in r.stdout and "--calibration" in r.stdout


@pytest.mark.slow
def test_quantize_text_check_in_json(cli, fixtures_dir, fx, tmp_path):
    if not (_models.TRAINED / "config.json").is_file():
        pytest.skip(f"the trained fixture is not built ({_models.TRAINED})")
    src = _models.exported(fixtures_dir, fx, "trained-gpt2")
    r = cli("quantize", src, tmp_path / "q.onnx", "--target", "cpu", "--per-channel", "--text", _models.HELDOUT,
            "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    ppl = next(c for c in out["verification"]["checks"] if c["name"] == "perplexity")
    # int8 moves perplexity either way (-0.31 % on an AVX2 CPU without VNNI): the budget bounds the rise only,
    # and the figure is the one measured again here, on the file written.
    assert ppl["passed"] is True and ppl["budget"] == 0.02 and abs(ppl["relative_change"]) <= 0.02
    ref_ppl, tokens = _lossy.perplexity(src / "model.onnx", src, _models.HELDOUT)
    cand_ppl, _ = _lossy.perplexity(tmp_path / "q.onnx", src, _models.HELDOUT)
    assert ppl["tokens"] == tokens and abs(ppl["relative_change"] - (cand_ppl / ref_ppl - 1)) <= _lossy.PPL_TOL
    r = cli("quantize", src, tmp_path / "q4.onnx", "--target", "cpu", "--method", "int4", "--text", _models.HELDOUT,
            "--max-ppl-increase", "0.000001")
    assert r.exit_code == 1 and "perplexity" in r.stderr and not (tmp_path / "q4.onnx").exists()
