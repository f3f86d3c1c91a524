"""Bad, corrupt and unsafe inputs through the CLI: exit 2, one line naming the file, no traceback, nothing
written. Internal bugs: exit 3 with the LLMCONV_DEBUG hint. Help texts and ``python -m llmconv``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmconv.checkpoint import TensorSource
from llmconv.formats import registry
from llmconv.formats.registry import Format

ROOT = Path(__file__).resolve().parents[2]

BAD_INPUTS = {
    "bad-header-length.safetensors": "header length 10000000 runs past the end",
    "bad-json.safetensors": "header is not valid JSON",
    "overlap.safetensors": "tensor 'b' overlaps the tensor before it",
    "unknown-dtype.safetensors": "tensor 'w' has unknown dtype 'F12'",
    "truncated-data.safetensors": "tensor 'w' runs past the end of the file",
    "truncated.bin": "torch.load cannot read it",
    "index-missing-shard": "index names shard 'model-00002-of-00002.safetensors', which is missing",
    "index-dotdot-shard": "shard path '../outside.safetensors' leaves the model's folder",
    "index-absolute-shard": "shard path '/etc/passwd' is absolute",
    "not-a-model.txt": "not a checkpoint llmconv recognises",
    "unsafe.bin": "pickle needs more than plain tensors to load",
}


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_convert_exit_2_one_line_nothing_written(cli, fx, tmp_path, name):
    src = fx(name)
    dst = tmp_path / "out" / "model.safetensors"
    r = cli("convert", src, dst)
    assert r.exit_code == 2
    line = one_error_line(r.stderr)
    assert str(src) in line and BAD_INPUTS[name] in line
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stdout == ""
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["overlap.safetensors", "truncated.bin", "index-dotdot-shard", "not-a-model.txt"])
def test_bad_input_inspect_and_verify_exit_2(cli, fx, name):
    r = cli("inspect", fx(name))
    assert r.exit_code == 2 and BAD_INPUTS[name] in one_error_line(r.stderr)
    r = cli("verify", fx("llama.safetensors"), fx(name))
    assert r.exit_code == 2 and BAD_INPUTS[name] in one_error_line(r.stderr)
    r = cli("inspect", fx(name), "--json")
    out = json.loads(r.stdout)
    assert r.exit_code == 2 and out["ok"] is False and out["error"]["code"] == 2
    assert BAD_INPUTS[name] in out["error"]["message"]


def test_unsafe_pickle_never_runs_even_with_the_unsafe_env(cli, fx, tmp_path):
    src = fx("unsafe.bin")
    marker = src.parent / "PWNED"
    dst = tmp_path / "o.safetensors"
    r = cli("convert", src, dst, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert r.exit_code == 2
    line = one_error_line(r.stderr)
    assert "(io.open)" in line or "(builtins.open)" in line  # the unsafe global is named
    assert "nothing in it was run" in line
    assert not marker.exists() and not dst.exists()
    r = cli("inspect", src, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert r.exit_code == 2 and not marker.exists()


def test_debug_env_shows_the_traceback(cli, fx, tmp_path):
    r = cli("convert", fx("overlap.safetensors"), tmp_path / "o.safetensors", env={"LLMCONV_DEBUG": "1"})
    assert r.exit_code == 2
    assert "Traceback (most recent call last)" in r.stderr
    assert "CorruptInput" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("error: ")


class _BuggyFormat(Format):
    """A format plugin with a bug: opening raises something that is not an LlmconvError."""

    name = "buggy-test"
    description = "test-only"
    extensions = (".buggy",)

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.suffix == ".buggy"

    def open(self, path: Path) -> TensorSource:
        return {}["no such key"]


@pytest.fixture
def buggy(monkeypatch, tmp_path) -> Path:
    monkeypatch.setitem(registry._FORMATS, _BuggyFormat.name, _BuggyFormat())
    path = tmp_path / "model.buggy"
    path.write_bytes(b"anything")
    return path


def test_internal_error_exit_3_with_debug_hint(cli, buggy, tmp_path):
    r = cli("inspect", buggy)
    assert r.exit_code == 3
    line = one_error_line(r.stderr)
    assert "internal error: KeyError: 'no such key'" in line
    assert "rerun with LLMCONV_DEBUG=1" in line
    assert "Traceback" not in r.stderr
    r = cli("convert", buggy, tmp_path / "o.safetensors", "--json")
    assert r.exit_code == 3
    out = json.loads(r.stdout)
    assert out["error"]["code"] == 3 and out["schema"] == "llmconv.convert/1"
    r = cli("inspect", buggy, env={"LLMCONV_DEBUG": "1"})
    assert r.exit_code == 3 and "Traceback (most recent call last)" in r.stderr
    assert "rerun with LLMCONV_DEBUG=1" not in r.stderr


def test_click_usage_errors_exit_2(cli):
    r = cli("convert")
    assert r.exit_code == 2 and "Examples:" in r.output  # no arguments at all: the command's help
    r = cli("convert", "a", "b", "--no-such-flag")
    assert r.exit_code == 2
    assert one_error_line(r.stderr) == "error: No such option: --no-such-flag (see 'llmconv convert --help')"
    r = cli("convert", "a")
    assert one_error_line(r.stderr) == "error: Missing argument 'DST'. (see 'llmconv convert --help')"
    r = cli("quantize", "a.onnx", "b.onnx", "--json")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.quantize/1" and out["ok"] is False and out["error"]["code"] == 2
    assert "Missing option '--target'" in out["error"]["message"]
    r = cli("bogus")
    assert r.exit_code == 2 and one_error_line(r.stderr).startswith("error: No such command 'bogus'.")


def test_json_errors_are_one_object_on_stdout(cli, fx, tmp_path):
    dst = tmp_path / "o.bin"
    dst.write_bytes(b"x")
    r = cli("convert", fx("llama.safetensors"), dst, "--json")
    assert r.exit_code == 2
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.convert/1" and out["ok"] is False and out["tensors"] is None
    assert out["error"] == {"code": 2, "message": f"{dst}: destination exists (pass --force to replace it)",
                            "kept": None}


@pytest.mark.parametrize("command", ["inspect", "convert", "verify", "formats"])
def test_every_command_help_shows_an_example(cli, command):
    r = cli(command, "--help", env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "Example" in r.stdout and "llmconv " + command in r.stdout


def test_python_m_llmconv_help(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmconv", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    for command in ("inspect", "convert", "verify", "formats"):
        assert command in r.stdout


@pytest.mark.slow
def test_python_m_llmconv_runs_a_command(fx, tmp_path):
    """A fresh interpreter that imports torch: seconds, hence slow."""
    r = subprocess.run([sys.executable, "-m", "llmconv", "inspect", str(fx("not-a-model.txt"))], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {fx('not-a-model.txt')}: not a checkpoint")
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_console_entry_point_exit_codes_and_complete_output(fx, tmp_path):
    """main() ends the process with os._exit once torch is loaded: stdout must still arrive whole,
    and exit codes 0, 1 and 2 must come through."""
    src = fx("gpt2-state-dict.bin")
    dst = tmp_path / "gpt2.safetensors"
    r = subprocess.run([sys.executable, "-m", "llmconv", "convert", str(src), str(dst), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["verified"] and dst.is_file()
    assert r.stderr == ""

    other = fx("llama.safetensors")
    r = subprocess.run([sys.executable, "-m", "llmconv", "verify", str(src), str(other), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert json.loads(r.stdout)["ok"] is False

    r = subprocess.run([sys.executable, "-m", "llmconv", "convert", str(src), str(dst)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert one_error_line(r.stderr) == f"error: {dst}: destination exists (pass --force to replace it)"


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "message"), [
    ("SIGINT", 130, "error: interrupted; the destination was left as it was"),
    ("SIGTERM", 143, "error: terminated (SIGTERM); the destination was left as it was"),
])
def test_interrupted_conversion_leaves_the_destination_as_it_was(tmp_path, sig, code, message):
    """Ctrl-C or SIGTERM in the middle of writing: the old destination intact, no temporary left."""
    import os
    import signal
    import time

    import torch
    from safetensors.torch import save_file

    src = tmp_path / "big.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({f"layer.{i}.weight": torch.randn(1024, 2048, generator=gen) for i in range(48)}, str(src))  # 400 MB
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "model.bin"
    dst.write_bytes(b"the previous model")
    proc = subprocess.Popen([sys.executable, "-m", "llmconv", "convert", str(src), str(dst), "--force"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(".model.bin.llmconv-tmp-") for p in out_dir.iterdir()):
            os.kill(proc.pid, getattr(signal, sig))
            break
        time.sleep(0.002)
    else:
        pytest.fail(f"the conversion ended before it could be interrupted (exit {proc.returncode})")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert one_error_line(stderr) == message
    assert dst.read_bytes() == b"the previous model"
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.bin"]


@pytest.mark.slow
def test_running_out_of_space_is_exit_2_naming_dst_and_leaves_nothing(fx, tmp_path, tmpfs):
    """On a real 1 MiB tmpfs (needs the right to mount one, else skipped): refused up front when the
    model cannot fit, and ENOSPC in the middle of a write when only the header does not."""
    import math
    import os

    from llmconv.formats import registry

    small = tmpfs("1m")
    src = fx("llama.safetensors")
    with registry.open_checkpoint(src) as s:
        total = s.total_bytes
    page = os.statvfs(small).f_frsize
    pages = os.statvfs(small).f_blocks
    dst = small / "l.safetensors"
    (small / "filler").write_bytes(b"\0" * ((pages - math.ceil(total / page) + 1) * page))
    r = subprocess.run([sys.executable, "-m", "llmconv", "convert", str(src), str(dst)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and one_error_line(r.stderr).startswith(f"error: {dst}: the output needs ")
    # Room for the tensor's bytes (50 whole pages), not for the header too: the check passes, the
    # write fails.
    import torch
    from safetensors.torch import save_file

    exact = tmp_path / "exact.safetensors"
    save_file({"w": torch.zeros(50 * page // 4)}, str(exact))
    (small / "filler").unlink()
    (small / "filler").write_bytes(b"\0" * ((pages - 50) * page))
    assert os.statvfs(small).f_bavail == 50
    r = subprocess.run([sys.executable, "-m", "llmconv", "convert", str(exact), str(dst)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert one_error_line(r.stderr).startswith(f"error: {dst}: cannot write the output: No space left on device")
    assert sorted(p.name for p in small.iterdir()) == ["filler"]
    # Through torch's zip writer (which may report ENOSPC as a RuntimeError): still the destination's.
    r = subprocess.run([sys.executable, "-m", "llmconv", "convert", str(exact), str(small / "l.bin")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert line.startswith(f"error: {small / 'l.bin'}: cannot write the output: ") and "space" in line.lower()
    assert sorted(p.name for p in small.iterdir()) == ["filler"]
