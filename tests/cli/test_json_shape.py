"""One JSON shape per command: the same top-level keys on exit 0, 1 and 2 (``error`` added whenever ``ok`` is
false), the command's own fields always there, the failed verification nested under ``verification``."""

from __future__ import annotations

import json

import pytest

from llmconv.cli import convert_cmd, inspect_cmd, prune_cmd, quantize_cmd, verify_cmd
from llmconv.formats import registry
from tests.cli.test_convert_cli import _LossyFormat
from tests.transforms import _models


def keys(cli, *args, code: int) -> dict:
    r = cli(*args, "--json")
    assert r.exit_code == code, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is (code == 0) and ("error" in out) is (code != 0)
    if code:
        assert out["error"]["code"] == code and out["error"]["message"] and "kept" in out["error"]
    if "verified" in out and code != 2:  # true only for an output verified and put in place (exit 2: null)
        assert out["verified"] is (code == 0 and out["verification"] is not None)
    return out


def same_shape(module, *objs: dict) -> None:
    want = {"schema", "ok", *module.JSON_FIELDS}
    for obj in objs:
        assert set(obj) - {"error"} == want, (set(obj) ^ want)


def test_quantize(cli, fx, tmp_path):
    src = fx("llama.safetensors")
    ok = keys(cli, "quantize", src, tmp_path / "h.safetensors", "--target", "gpu", code=0)
    # A cast checked with no tolerance at all: the fp16 weights differ, exit 1 and nothing written.
    bad = keys(cli, "quantize", src, tmp_path / "b.safetensors", "--target", "gpu", "--atol", "0", "--rtol", "0",
               "--keep-failed", tmp_path / "failed", code=1)
    usage = keys(cli, "quantize", src, tmp_path / "u.safetensors", "--target", "tpu", code=2)
    same_shape(quantize_cmd, ok, bad, usage)
    # exit 1 keeps the command's own report (what it knows) and nests the verification; nothing was written.
    assert bad["method"] == ok["method"] == "fp16" and bad["target"] == "gpu" and bad["tensors_cast"] == 21
    assert bad["size_before"] == ok["size_before"] and bad["size_after"] is None and bad["files"] == []
    assert bad["verification"]["ok"] is False and bad["verification"]["schema"] == "llmconv.verify/1"
    assert not (tmp_path / "b.safetensors").exists()
    assert bad["error"]["kept"] == str(tmp_path / "failed" / "b.safetensors") and (tmp_path / "failed").is_dir()
    assert ok["bytes_written"] == (tmp_path / "h.safetensors").stat().st_size
    assert ok["destination_format"] == "safetensors"
    assert usage["method"] is None and usage["verification"] is None and usage["seconds"] >= 0
    assert "unknown --target 'tpu'" in usage["error"]["message"]


def test_prune(cli, fx, fixtures_dir, tmp_path):
    ok = keys(cli, "prune", fx("llama.safetensors"), tmp_path / "p.safetensors", "--sparsity", "0.5", code=0)
    onnx = _models.exported(fixtures_dir, fx, "llama-hf")  # shared with the other prune and quantize tests
    bad = keys(cli, "prune", onnx, tmp_path / "p.onnx", "--sparsity", "0.5", "--pattern", "rows", "--min-top1", "0.99",
               code=1)
    usage = keys(cli, "prune", fx("llama.safetensors"), tmp_path / "u.safetensors", "--sparsity", "2", code=2)
    same_shape(prune_cmd, ok, bad, usage)
    assert ok["quality"] is None and ok["destination_format"] == "safetensors"
    assert bad["pattern"] == "rows" and bad["quality"]["ok"] is False and bad["verification"]["ok"] is True
    assert bad["achieved"]["tensors"] > 0 and bad["bytes_written"] is None and bad["files"] == []
    assert usage["pattern"] is None and usage["quality"] is None


def test_convert(cli, fx, tmp_path, monkeypatch):
    src = fx("llama.safetensors")
    ok = keys(cli, "convert", src, tmp_path / "o.bin", code=0)
    exists = tmp_path / "exists.bin"
    exists.write_bytes(b"x")
    usage = keys(cli, "convert", src, exists, code=2)
    monkeypatch.setitem(registry._FORMATS, _LossyFormat.name, _LossyFormat())
    bad = keys(cli, "convert", src, tmp_path / "o.lossy", code=1)
    same_shape(convert_cmd, ok, bad, usage)
    assert ok["task"] is None and ok["verification"]["ok"] is True
    assert bad["source_format"] == "safetensors" and bad["tensors"] == ok["tensors"] and bad["files"] == []
    assert bad["verification"]["ok"] is False and bad["bytes_written"] is None
    assert usage["source"] is None and usage["verification"] is None


def test_verify(cli, fx):
    ok = keys(cli, "verify", fx("llama-hf"), fx("llama-hf"), code=0)
    bad = keys(cli, "verify", fx("llama-hf"), fx("llama-hf-perturbed"), "--mode", "weights", code=1)
    usage = keys(cli, "verify", fx("llama-hf"), fx("llama-hf"), "--seq-len", "0", code=2)
    same_shape(verify_cmd, ok, bad, usage)
    assert "checks failed" in bad["error"]["message"] and not all(c["passed"] for c in bad["checks"])
    assert ok["inputs"] is None and ok["seconds"] > 0 and bad["seconds"] > 0 and ok["missing"] == []
    assert usage["mode"] is None and usage["checks"] is None


@pytest.mark.parametrize("fixture", ["llama.safetensors", "gpt2-hf"])
def test_inspect(cli, fx, tmp_path, fixture):
    ok = keys(cli, "inspect", fx(fixture), code=0)
    usage = keys(cli, "inspect", tmp_path / "missing.safetensors", code=2)
    same_shape(inspect_cmd, ok, usage)
    assert ok["seconds"] >= 0 and (ok["architecture"] is None) is (fixture == "llama.safetensors")


@pytest.mark.parametrize("command", ["formats", "env"])
def test_formats_and_env_keep_their_keys_on_a_usage_error(cli, command):
    from llmconv.cli import env_cmd, formats_cmd

    module = {"formats": formats_cmd, "env": env_cmd}[command]
    ok = keys(cli, command, code=0)
    usage = keys(cli, command, "--bogus", code=2)
    same_shape(module, ok, usage)
    assert ok["seconds"] >= 0 and usage["seconds"] >= 0


def test_quantize_of_an_hf_folder_whose_export_fails_keeps_quantize_s_shape(cli, fx, tmp_path):
    """The export's check fails first (a NaN model): the body stays quantize's, the export's verification nested."""
    bad = keys(cli, "quantize", fx("llama-hf-nan"), tmp_path / "q", "--target", "cpu", code=1)
    same_shape(quantize_cmd, bad)
    assert bad["schema"] == "llmconv.quantize/1" and bad["verification"]["ok"] is False
    assert "the exported graph's outputs differ from PyTorch's" in bad["error"]["message"]
