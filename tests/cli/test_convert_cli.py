"""`llmconv convert` through the CLI: exit codes, JSON, human output, progress, atomic and verified outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmconv.formats import registry
from llmconv.formats import safetensors as st_format
from llmconv.formats.registry import Format


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".llmconv-" in p.name)


def test_convert_json(cli, fx, tmp_path):
    dst = tmp_path / "gpt2.safetensors"
    r = cli("convert", fx("gpt2-state-dict.bin"), dst, "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.convert/1" and out["ok"] is True
    assert out["source_format"] == "pytorch" and out["destination_format"] == "safetensors"
    assert out["tensors"] == 28 and out["parameters"] == 173_824
    assert out["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert out["files"] == [str(dst)] and out["bytes_written"] == dst.stat().st_size
    assert out["dtype"] == "keep" and out["cast"] == []
    assert out["dropped_aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert out["verified"] is True and out["verification"]["ok"] is True
    assert len(out["verification"]["checks"]) == 28 and out["verification"]["tied"] == ["lm_head.weight"]
    assert r.stderr == ""  # no progress bar, no human text
    assert len(load_file(dst)) == 28


def test_convert_human_output_and_no_progress_without_a_terminal(cli, fx, tmp_path):
    r = cli("convert", fx("gpt2-hf-bin"), tmp_path / "out", "--to", "safetensors")
    assert r.exit_code == 0, r.stderr
    assert "converted" in r.stdout and "(hf folder, safetensors weights)" in r.stdout
    assert "28 tensors (+1 tied), 173,824 parameters" in r.stdout
    assert "tied: lm_head.weight is stored once, as transformer.wte.weight" in r.stdout
    assert "verified: all 28 checks passed (weights, exact)" in r.stdout
    assert r.stderr == ""
    for word in ("writing", "%", "━"):
        assert word not in r.stderr


def test_quiet_prints_nothing(cli, fx, tmp_path):
    r = cli("convert", fx("llama.safetensors"), tmp_path / "o.bin", "--quiet")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""
    assert (tmp_path / "o.bin").is_file()


def test_no_verify(cli, fx, tmp_path):
    r = cli("convert", fx("llama.safetensors"), tmp_path / "o.bin", "--no-verify", "--json")
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    assert out["verified"] is False and out["verification"] is None
    r = cli("convert", fx("llama.safetensors"), tmp_path / "p.bin", "--no-verify")
    assert "not verified" in r.stdout


def test_dtype_fp16_reports_casts(cli, fx, tmp_path):
    r = cli("convert", fx("llama.safetensors"), tmp_path / "o.safetensors", "--dtype", "fp16", "--json")
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    assert out["dtype"] == "float16" and len(out["cast"]) == 21
    assert all(t.dtype == torch.float16 for t in load_file(tmp_path / "o.safetensors").values())
    r = cli("convert", fx("llama.safetensors"), tmp_path / "p.safetensors", "--dtype", "bf16")
    assert "cast 21 floating-point tensors to bfloat16" in r.stdout
    assert "verified: all 21 checks passed (weights, exact, against the cast values)" in r.stdout


def test_fp16_overflow_exit_2_naming_tensor_and_value(cli, fx, tmp_path):
    dst = tmp_path / "o.safetensors"
    r = cli("convert", fx("fp16-overflow.safetensors"), dst, "--dtype", "fp16")
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1
    assert "tensor 'big' has a value of magnitude 70000, past the float16 maximum 65504" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not dst.exists() and leftovers(tmp_path) == []


def test_fp16_overflow_over_existing_destination_with_force(cli, fx, tmp_path):
    dst = tmp_path / "o.safetensors"
    old = fx("llama.safetensors").read_bytes()
    dst.write_bytes(old)
    r = cli("convert", fx("fp16-overflow.safetensors"), dst, "--dtype", "fp16", "--force", "--json")
    assert r.exit_code == 2
    err = json.loads(r.stdout)
    assert err["schema"] == "llmconv.convert/1" and err["ok"] is False and err["error"]["code"] == 2
    assert "'big'" in err["error"]["message"]
    assert dst.read_bytes() == old
    assert leftovers(tmp_path) == []


def test_existing_destination_needs_force(cli, fx, tmp_path):
    dst = tmp_path / "o.bin"
    dst.write_bytes(b"old")
    r = cli("convert", fx("llama.safetensors"), dst)
    assert r.exit_code == 2
    assert r.stderr.strip() == f"error: {dst}: destination exists (pass --force to replace it)"
    assert dst.read_bytes() == b"old"
    r = cli("convert", fx("llama.safetensors"), dst, "--force", "-q")
    assert r.exit_code == 0 and torch.load(dst, weights_only=True).keys() == load_file(fx("llama.safetensors")).keys()


def test_destination_equal_to_or_inside_source(cli, fx_copy):
    src = fx_copy("llama-hf-sharded")
    before = sorted(p.name for p in src.iterdir())
    r = cli("convert", src, src, "--force")
    assert r.exit_code == 2 and "destination is the source itself" in r.stderr
    r = cli("convert", src, src / "inner.safetensors")
    assert r.exit_code == 2 and "destination lies inside the source folder" in r.stderr
    r = cli("convert", src / "model-00001-of-00006.safetensors", src, "--force")
    assert r.exit_code == 2 and "contains the source" in r.stderr
    assert sorted(p.name for p in src.iterdir()) == before


@pytest.mark.parametrize(("size", "count"), [("2GB", 1), ("500MB", 1), ("100KB", 6)])
def test_shard_size_flag(cli, fx, tmp_path, size, count):
    dst = tmp_path / "out"
    r = cli("convert", fx("llama.safetensors"), dst, "--to", "pytorch", "--shard-size", size, "--json")
    assert r.exit_code == 0, r.stderr
    bins = sorted(p.name for p in dst.glob("*.bin"))
    assert len(bins) == count
    if count > 1:
        index = json.loads((dst / "pytorch_model.bin.index.json").read_text())
        assert set(index["weight_map"].values()) == set(bins)


def test_usage_errors_exit_2(cli, fx, tmp_path):
    r = cli("convert", fx("llama.safetensors"), tmp_path / "o.safetensors", "--shard-size", "lots")
    assert r.exit_code == 2 and "cannot read size 'lots'" in r.stderr
    r = cli("convert", fx("llama.safetensors"), tmp_path / "o.safetensors", "--dtype", "int3")
    assert r.exit_code == 2 and "unknown --dtype 'int3' (use keep, fp32, fp16 or bf16)" in r.stderr
    dst = tmp_path / "x.safetensors"
    r = cli("convert", fx("llama.safetensors"), dst, "--shard-size", "100KB")
    assert r.exit_code == 2
    assert r.stderr.startswith(f"error: {dst}: --shard-size 100KB needs a folder destination")
    assert "llmconv-tmp" not in r.stderr
    r = cli("convert", fx("llama.safetensors"), tmp_path / "o.safetensors", "--to", "gguf")
    assert r.exit_code == 2 and "a GGUF file needs the model's architecture" in r.stderr
    r = cli("convert", fx("llama.safetensors"), tmp_path / "o.safetensors", "--to", "ggml")
    assert r.exit_code == 2 and "unknown format 'ggml'" in r.stderr
    r = cli("convert", fx("llama.safetensors"), tmp_path / "hf-out", "--to", "hf")
    assert r.exit_code == 2
    assert r.stderr.startswith(f"error: {tmp_path / 'hf-out'}: an hf folder needs a config.json")
    assert leftovers(tmp_path) == [] and not (tmp_path / "o.safetensors").exists()


def test_hf_folder_round_trip_through_the_cli(cli, fx, tmp_path):
    a, b = tmp_path / "bin", tmp_path / "st"
    assert cli("convert", fx("gpt2-hf"), a, "--to", "pytorch", "--shard-size", "100KB", "-q").exit_code == 0
    assert cli("convert", a, b, "--to", "safetensors", "-q").exit_code == 0
    assert (b / "model.safetensors").read_bytes() == (fx("gpt2-hf") / "model.safetensors").read_bytes()
    r = cli("verify", fx("gpt2-hf"), b)
    assert r.exit_code == 0


class _LossyFormat(Format):
    """A format plugin whose writer flips one byte: the verification step must refuse its output."""

    name = "lossy-cli-test"
    extensions = (".lossy",)

    def sniff(self, path: Path, head: bytes) -> bool:
        return False

    def open(self, path: Path):
        return st_format.open_file(path)

    def write(self, src, dst: Path, *, folder: bool, options) -> list[Path]:
        st_format.write_file(src, src.canonical_names(), dst, metadata={})
        data = bytearray(dst.read_bytes())
        data[-1] ^= 0x01
        dst.write_bytes(bytes(data))
        return [dst]


def test_failed_verification_exit_1_and_nothing_written(cli, fx, tmp_path, monkeypatch):
    fmt = _LossyFormat()
    monkeypatch.setitem(registry._FORMATS, fmt.name, fmt)
    dst = tmp_path / "o.lossy"
    r = cli("convert", fx("llama.safetensors"), dst, "--json")
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.convert/1" and out["ok"] is False and out["error"]["code"] == 1
    assert "written output differs from the source" in out["error"]["message"]
    failing = [c for c in out["verification"]["checks"] if not c["passed"]]
    assert len(failing) == 1 and failing[0]["max_abs"] > 0
    assert not dst.exists() and leftovers(tmp_path) == []
    r = cli("convert", fx("llama.safetensors"), dst)
    assert r.exit_code == 1 and "FAIL" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith(f"error: {dst}: written output differs")


@pytest.mark.parametrize(("name", "said"), [
    ("out.ggml", ".ggml is GGML (llama.cpp's old format), which llmconv does not write"),
    ("w.ckpt", ".ckpt is a training checkpoint"),
    ("w.h5", ".h5 is Keras/TensorFlow HDF5"),
    ("w.safetensor", "unknown destination extension .safetensor (did you mean .safetensors?"),
    ("out.v2", "unknown destination extension .v2 (llmconv writes"),
])
def test_a_destination_extension_of_no_format_llmconv_writes_is_refused_not_made_a_folder(cli, fx, tmp_path, name,
                                                                                           said):
    r = cli("convert", fx("gpt2-state-dict.bin"), tmp_path / name)
    assert r.exit_code == 2 and said in r.stderr, r.stderr
    assert ".bin, .gguf, .onnx, .pt, .pth, .safetensors, or a folder" in r.stderr
    assert list(tmp_path.iterdir()) == []
    r = cli("prune", fx("gpt2-state-dict.bin"), tmp_path / name, "--sparsity", "0.5")
    assert r.exit_code == 2 and said in r.stderr and list(tmp_path.iterdir()) == []


def test_a_folder_name_with_a_dot_is_written_with_to_or_when_the_suffix_is_no_extension(cli, fx, tmp_path):
    r = cli("convert", fx("gpt2-state-dict.bin"), tmp_path / "gpt2.v2", "--to", "safetensors")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "gpt2.v2" / "model.safetensors").is_file()
    r = cli("convert", fx("gpt2-state-dict.bin"), tmp_path / "Qwen2.5-0.5B")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "Qwen2.5-0.5B").is_dir()
