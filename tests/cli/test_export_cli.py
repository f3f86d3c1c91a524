"""``llmconv convert ... --to onnx`` and weights back out, through the CLI."""

from __future__ import annotations

import json

import onnx
import pytest

from tests.export import _exports  # noqa: F401  (sets LLMCONV_ORT_THREADS for the in-process runs)


def test_export_folder_json(fx, cli, tmp_path):
    dst = tmp_path / "bert-onnx"
    r = cli("convert", fx("bert-hf"), dst, "--to", "onnx", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.convert/1" and out["ok"] is True
    assert out["destination_format"] == "onnx" and out["task"] == "feature-extraction"
    assert out["exporter"] == "optimum" and out["opset"] == 18 and out["external_data"] is False
    assert out["verified"] is True and out["verification"]["ok"] is True
    assert out["verification"]["checks"][0]["name"] == "last_hidden_state"
    assert str(dst / "model.onnx") in out["files"] and str(dst / "tokenizer.json") in out["files"]
    assert out["tensors"] == len(onnx.load(str(dst / "model.onnx")).graph.initializer)


def test_export_file_human_output(fx, cli, tmp_path):
    r = cli("convert", fx("phi3-hf"), tmp_path / "phi3.onnx", "--task", "text-generation", "--opset", "17",
            "--external-data")
    assert r.exit_code == 0, r.output
    assert "converted" in r.stdout and "(onnx)" in r.stdout
    assert "verified: all 4 checks passed (outputs, fp32)" in r.stdout  # logits, decode.prefill/steps, generation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi3.onnx", "phi3.onnx_data"]


def test_bare_weights_exit_2_then_config(fx, cli, tmp_path):
    r = cli("convert", fx("llama.safetensors"), tmp_path / "m.onnx")
    assert r.exit_code == 2
    assert "a bare weights file holds no architecture, and an ONNX graph needs the model's config" in r.stderr
    assert "--config path/to/config.json" in r.stderr and not (tmp_path / "m.onnx").exists()
    r = cli("convert", fx("llama.safetensors"), tmp_path / "m.onnx", "--config", fx("llama-hf") / "config.json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.onnx").is_file()


def test_failed_verification_exit_1_nothing_written(fx, cli, tmp_path):
    dst = tmp_path / "nan.onnx"
    r = cli("convert", fx("llama-hf-nan"), dst, "--json")
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["error"]["code"] == 1
    assert "outputs differ from PyTorch's" in out["error"]["message"]
    v = out["verification"]  # the report travels with the error, under the command's own fields
    assert v["mode"] == "outputs" and v["checks"][0]["nan"] > 0 and out["source"] == str(fx("llama-hf-nan"))
    assert list(tmp_path.iterdir()) == []
    r = cli("convert", fx("llama-hf-nan"), dst, "--no-verify")
    assert r.exit_code == 0 and "not verified" in r.stdout and dst.is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--dtype", "fp16"], "ONNX export writes float32 graphs"),
    (["--task", "text-generation-with-past"], "optimum exports bert for"),
    (["--opset", "3"], "--opset 3 is outside what the exporter writes"),
    (["--shard-size", "100KB"], "--shard-size applies to weights destinations"),
])
def test_bad_export_flags_exit_2(fx, cli, tmp_path, args, message):
    r = cli("convert", fx("bert-hf"), tmp_path / "b.onnx", *args)
    assert r.exit_code == 2
    assert message in r.stderr and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_onnx_weights_out_and_back_in(fx, fixtures_dir, cli, tmp_path):
    folder = _exports.export(fixtures_dir, fx, "qwen2-hf")[0]
    r = cli("convert", folder / "model.onnx", tmp_path / "w.safetensors", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["source_format"] == "onnx" and out["verification"]["mode"] == "weights"
    assert out["verification"]["ok"] is True
    r = cli("verify", folder / "model.onnx", tmp_path / "w.safetensors", "--mode", "weights")
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_a_failed_export_keeps_stdout_to_the_json_object(fx, tmp_path):
    """torch's exporter dumps its IR graph on stdout when it fails (its ONNX log, left switched on):
    --json must still print exactly one object there, and stderr one line."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "llmconv", "convert", str(fx("llama-hf")), str(tmp_path / "o"),
                        "--to", "onnx", "--opset", "9", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    out = json.loads(r.stdout)
    assert out["error"]["code"] == 2 and "cannot export llama at opset 9" in out["error"]["message"]
    assert r.stderr.count("\n") == 1 and "Torch IR graph" not in r.stdout + r.stderr
