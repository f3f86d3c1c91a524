"""``llmconv merge`` through the CLI: exit codes, human output, --json, --no-verify, --force, --weights, --to,
--junit, repeated --adapter, --help, and the merged folder exported to ONNX."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from llmconv.cli.merge_cmd import JSON_FIELDS
from tests.export import _exports  # noqa: F401  (sets LLMCONV_ORT_THREADS for the in-process runs)

# Small decode and generation checks: every kind of check still runs.
FAST = ("--decode-steps", "1", "--generate", "1")


def test_merge_human_output(cli, fx, tmp_path):
    dst = tmp_path / "merged"
    r = cli("merge", fx("llama-hf"), fx("llama-lora"), dst, *FAST)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("merged 1 adapter(s) into ")
    assert "(hf folder, safetensors weights, float32)" in r.stdout
    assert "weight 1, r 4, alpha 8, scale 2.0, 14 modules" in r.stdout
    assert "14 tensors merged, 0 replaced" in r.stdout
    assert "verified against PEFT 0.21" in r.stdout and "(PeftModel, adapters unmerged)" in r.stdout
    assert "(outputs, fp32); weights read back:" in r.stdout
    assert r.stderr == "" and "Traceback" not in r.output
    assert (dst / "config.json").is_file() and (dst / "model.safetensors").is_file()


def test_merge_json(cli, fx, tmp_path):
    dst = tmp_path / "merged"
    r = cli("merge", fx("gpt2-hf"), fx("gpt2-lora"), dst, "--json", *FAST)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.merge/1" and out["ok"] is True
    assert [k for k in JSON_FIELDS if k not in out] == []
    assert out["verified"] is True and out["verification"]["ok"] is True
    assert out["weights_verification"]["ok"] is True
    assert out["reference"].startswith("PEFT 0.21") and out["destination_format"] == "hf"
    assert len(out["merged"]) == 8 and out["replaced"] == []
    assert sorted(out["files"]) == sorted(str(p) for p in dst.iterdir())
    assert str(dst / "model.safetensors") in out["files"] and str(dst / "config.json") in out["files"]
    assert out["bytes_written"] == sum(p.stat().st_size for p in dst.iterdir())
    assert r.stderr == ""


def test_no_verify(cli, fx, tmp_path):
    r = cli("merge", fx("llama-hf"), fx("llama-lora"), tmp_path / "a", "--no-verify", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["verified"] is False and out["verification"] is None and out["weights_verification"] is None
    assert out["reference"] is None
    r = cli("merge", fx("llama-hf"), fx("llama-lora"), tmp_path / "b", "--no-verify")
    assert r.exit_code == 0 and "not verified" in r.stdout


def test_existing_destination_needs_force(cli, fx, tmp_path):
    dst = tmp_path / "merged"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    r = cli("merge", fx("llama-hf"), fx("llama-lora"), dst, "--no-verify")
    assert r.exit_code == 2
    assert r.stderr.strip() == f"error: {dst}: destination exists (pass --force to replace it)"
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt"]
    r = cli("merge", fx("llama-hf"), fx("llama-lora"), dst, "--force", "-q", *FAST)
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""
    assert not (dst / "old.txt").exists() and (dst / "model.safetensors").is_file()


def test_weights_count_must_match(cli, fx, tmp_path):
    dst = tmp_path / "merged"
    r = cli("merge", fx("llama-hf"), fx("llama-lora"), dst, "--weights", "1,0.5")
    assert r.exit_code == 2 and "--weights gives 2 number(s) for 1 adapter(s)" in r.stderr
    r = cli("merge", fx("llama-hf"), fx("llama-lora"), dst, "--adapter", fx("llama-lora-b"), "--weights", "1")
    assert r.exit_code == 2 and "--weights gives 1 number(s) for 2 adapter(s)" in r.stderr
    assert "Traceback" not in r.output and not dst.exists()


def test_to_onnx_is_refused_with_the_chain(cli, fx, tmp_path):
    dst = tmp_path / "merged"
    r = cli("merge", fx("llama-hf"), fx("llama-lora"), dst, "--to", "onnx")
    assert r.exit_code == 2
    assert "merge writes a Hugging Face folder" in r.stderr
    assert f"llmconv convert {dst} OUT --to onnx" in r.stderr
    assert not dst.exists()


def test_junit_and_repeated_adapter(cli, fx, tmp_path):
    dst, xml = tmp_path / "merged", tmp_path / "merge.xml"
    r = cli("merge", fx("llama-hf"), fx("llama-lora"), dst, "--adapter", fx("llama-lora-b"), "--weights", "1,0.5",
            "--junit", xml, "--json", *FAST)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [a["path"] for a in out["adapters"]] == [str(fx("llama-lora")), str(fx("llama-lora-b"))]
    assert [a["weight"] for a in out["adapters"]] == [1.0, 0.5] and out["verified"] is True
    suite = ET.parse(xml).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert suite.get("name") == "llmconv.merge" and suite.get("failures") == "0" and suite.get("errors") == "0"
    assert cases[0].get("name") == "merge"
    assert cases[0].find("system-out").text.startswith("2 adapter(s) merged into 14 tensors")
    assert {"logits", "generation"} <= {c.get("name") for c in cases}


def test_help_shows_an_example(cli):
    r = cli("merge", "--help")
    assert r.exit_code == 0
    assert "llmconv merge llama-hf my-lora llama-merged" in r.stdout
    assert "--adapter" in r.stdout and "--weights" in r.stdout


def test_merge_then_export_to_onnx(cli, fx, tmp_path):
    merged, onnx_dir = tmp_path / "merged", tmp_path / "onnx"
    assert cli("merge", fx("qwen2-hf"), fx("qwen2-lora"), merged, "-q", *FAST).exit_code == 0
    r = cli("convert", merged, onnx_dir, "--to", "onnx", "--json", *FAST)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["verified"] is True and out["destination_format"] == "onnx"
    assert (onnx_dir / "model.onnx").is_file()
    r = cli("verify", merged, onnx_dir / "model.onnx", *FAST)
    assert r.exit_code == 0, r.output
    # The export is of the merged weights, not the base's: the base fails against it.
    r = cli("verify", fx("qwen2-hf"), onnx_dir / "model.onnx", "--decode-steps", "0", "--generate", "0")
    assert r.exit_code == 1
