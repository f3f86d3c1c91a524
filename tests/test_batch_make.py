"""The Makefile's batch conversion: one target per model, failures kept apart, a summary, and refusals
of what make cannot do safely."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make(*args: str) -> subprocess.CompletedProcess:
    # The batch targets themselves, run with this interpreter (not `batch`, which first runs `install`).
    bin_dir = Path(sys.executable).parent
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), f"BIN={bin_dir}",
                           f"LLMCONV={bin_dir / 'llmconv'}", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_batch_converts_each_model_verified_and_reports_failures(fx, tmp_path):
    models, out = tmp_path / "models", tmp_path / "converted"
    models.mkdir()
    shutil.copy(fx("gpt2-state-dict.bin"), models / "gpt2.bin")
    shutil.copytree(fx("llama-hf-bin-sharded"), models / "llama-hf")
    shutil.copy(fx("truncated.bin"), models / "broken.bin")
    args = [f"MODELS_DIR={models}", f"OUT_DIR={out}", "TO=safetensors"]
    r = make("-j2", "-k", "batch-check", "batch-models", *args)
    assert r.returncode != 0  # broken.bin fails, and -k still converts the others
    assert "FAILED: broken.bin (exit 2)" in r.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["gpt2.safetensors", "llama-hf"]
    report = json.loads((out / ".status" / "gpt2.bin.json").read_text())
    assert report["ok"] and report["verified"] and report["verification"]["ok"]
    failed = json.loads((out / ".status" / "broken.bin.json.failed").read_text())
    assert failed["error"]["code"] == 2 and "broken.bin" in failed["error"]["message"]
    summary = make("batch-summary", *args)
    assert summary.returncode == 0 and "2 converted, 1 failed" in summary.stdout


@pytest.mark.slow
def test_batch_refuses_colliding_outputs_spaces_and_a_missing_folder(fx, tmp_path):
    models, out = tmp_path / "models", tmp_path / "converted"
    models.mkdir()
    shutil.copy(fx("gpt2-state-dict.bin"), models / "model.bin")
    shutil.copy(fx("bert.pt"), models / "model.pt")
    r = make("batch-check", f"MODELS_DIR={models}", f"OUT_DIR={out}")
    assert r.returncode != 0 and f"would be written to {out}/model.safetensors" in r.stderr
    (models / "model.pt").rename(models / "a model.pt")
    r = make("batch-check", f"MODELS_DIR={models}", f"OUT_DIR={out}")
    assert r.returncode != 0 and 'make cannot name targets with spaces: "a model.pt"' in r.stderr
    r = make("batch-check", f"MODELS_DIR={tmp_path / 'nope'}")
    assert r.returncode != 0 and "no such folder" in r.stderr
    assert not out.exists()


def _rows(summary: str, name: str) -> list[str]:
    """The summary table's rows for model ``name`` (its first cell)."""
    return [line for line in summary.splitlines() if line.startswith(f"│ {name} ")]


@pytest.mark.slow
def test_batch_summary_lists_each_existing_model_once_with_its_latest_status(fx, tmp_path):
    models, out = tmp_path / "models", tmp_path / "converted"
    models.mkdir()
    for name in ("a.bin", "b.bin", "c.bin"):
        shutil.copy(fx("gpt2-state-dict.bin"), models / name)
    args = [f"MODELS_DIR={models}", f"OUT_DIR={out}", "TO=safetensors"]
    assert make("-j2", "batch-check", "batch-models", *args).returncode == 0
    assert "3 converted, 0 failed" in make("batch-summary", *args).stdout

    # b.bin breaks (newer than its report, so make converts it again); c.bin is deleted.
    shutil.copy(fx("truncated.bin"), models / "b.bin")
    later = (out / ".status" / "b.bin.json").stat().st_mtime + 10
    os.utime(models / "b.bin", (later, later))
    (models / "c.bin").unlink()
    r = make("-k", "batch-models", *args)
    assert r.returncode != 0 and "FAILED: b.bin (exit 2)" in r.stderr
    assert not (out / ".status" / "b.bin.json").exists() and (out / ".status" / "b.bin.json.failed").exists()
    summary = make("batch-summary", *args).stdout
    assert "1 converted, 1 failed" in summary
    assert len(_rows(summary, "a.bin")) == 1 and "ok" in _rows(summary, "a.bin")[0]
    assert len(_rows(summary, "b.bin")) == 1 and "FAILED" in _rows(summary, "b.bin")[0]
    assert _rows(summary, "c.bin") == []

    # Without its .json, the failed model is tried again; fixed, it is listed as ok only.
    shutil.copy(fx("gpt2-state-dict.bin"), models / "b.bin")
    assert make("batch-models", *args).returncode == 0
    assert not (out / ".status" / "b.bin.json.failed").exists()
    summary = make("batch-summary", *args).stdout
    assert "2 converted, 0 failed" in summary and len(_rows(summary, "b.bin")) == 1
