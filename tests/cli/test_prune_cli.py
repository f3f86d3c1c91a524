"""`llmconv prune` through the CLI: exit codes 0/1/2, --json per the contract, human output, help, inspect."""

from __future__ import annotations

import json

import pytest

from tests.transforms import _models


@pytest.fixture(scope="session")
def llama_onnx(fixtures_dir, fx):
    return _models.exported(fixtures_dir, fx, "llama-hf")


def test_prune_json(cli, fx, tmp_path):
    dst = tmp_path / "p.safetensors"
    r = cli("prune", fx("llama.safetensors"), dst, "--sparsity", "0.5", "--pattern", "2:4", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.prune/1" and out["ok"] is True and out["pattern"] == "2:4"
    assert out["achieved"]["overall"] == 0.5 and out["achieved"]["tensors"] == 14
    assert all(t["sparsity"] == 0.5 and t["pattern_ok"] for t in out["tensors"])
    assert out["verified"] is True and out["verification"]["ok"] is True and out["quality"] is None
    assert out["files"] == [str(dst)] and r.stderr == ""


def test_prune_human_output_and_inspect_sparsity(cli, llama_onnx, tmp_path):
    dst = tmp_path / "p.onnx"
    r = cli("prune", llama_onnx, dst, "--sparsity", "0.3", "--min-top1", "0")
    assert r.exit_code == 0, r.stderr
    assert "pruned" in r.stdout and "unstructured at 0.3" in r.stdout
    assert "tensors pruned  14" in r.stdout and "30.00% of the pruned tensors" in r.stdout
    assert "quality (min_top1=0.0, max_ppl_increase=0.5)" in r.stdout
    r = cli("inspect", dst, "--sparsity", "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert 0.1 < info["sparsity"]["overall"] < 0.3


def test_prune_quality_failure_exits_1(cli, llama_onnx, tmp_path):
    r = cli("prune", llama_onnx, tmp_path / "p.onnx", "--sparsity", "0.5", "--pattern", "rows", "--min-top1", "0.99",
            "--json")
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.prune/1" and out["ok"] is False and out["error"]["code"] == 1
    assert "fails the quality check" in out["error"]["message"] and out["quality"]["profile"] == "quality"
    assert out["quality"]["thresholds"] == {"min_top1": 0.99, "max_ppl_increase": 0.5, "finite": True}
    assert out["verification"]["ok"] is True and out["files"] == [] and out["tensors"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--pattern", "2:4", "--sparsity", "0.7"], "--pattern 2:4 zeroes exactly half of the weights"),
    (["--pattern", "blocks", "--sparsity", "0.5"], "unknown --pattern 'blocks'"),
    ([], "--pattern unstructured needs --sparsity FRACTION"),
    (["--sparsity", "0.5", "--include", "nope*"], "no tensor was selected for pruning"),
])
def test_prune_usage_errors_exit_2(cli, fx, tmp_path, args, message):
    r = cli("prune", fx("llama.safetensors"), tmp_path / "p.safetensors", *args)
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_prune_help_has_examples(cli):
    r = cli("prune", "--help")
    assert r.exit_code == 0
    assert "llmconv prune model.safetensors pruned.safetensors --sparsity 0.5" in r.stdout
    assert "2:4" in r.stdout and "shapes kept" in r.stdout
