"""Issue 7, item 1: code from a model folder never runs; item 8: a non-UTF-8 onnxruntime message is exit 2.

Every hostile folder's Python file writes a marker when imported (fixtures/hostile_remote.py). Each
command gets "y" on stdin, the answer that made transformers run the code: it must exit 2 naming the
file, with no prompt and no marker. In-process runs feed "y" through CliRunner's stdin; the real-process
runs cover a closed stdin and a terminal.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fixtures.hostile_remote import MARKER_ENV

ROOT = Path(__file__).resolve().parents[2]
NEVER = "llmconv never runs code from a model folder"
PROMPT = "Do you wish to run the custom code"


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """Where the hostile code would write if it ran (and transformers' module cache, kept in tmp_path)."""
    path = tmp_path / "PWNED"
    monkeypatch.setenv(MARKER_ENV, str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return path


@pytest.fixture
def cli_y(marker):
    """The CLI in-process with "y\\n" waiting on stdin, as in ``printf 'y\\n' | llmconv ...``."""
    from llmconv.cli.app import app

    runner = CliRunner()

    def run(*args: object):
        return runner.invoke(app, [str(a) for a in args], input="y\n", catch_exceptions=False)

    return run


def _refused(r, marker: Path, *names: str) -> None:
    assert r.exit_code == 2, r.stderr + r.stdout
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert NEVER in line and PROMPT not in r.stdout + r.stderr
    for name in names:
        assert name in line
    assert not marker.exists()


def _subprocess(args: list[object], *, cwd: Path, stdin: object, timeout: float = 120, **kw):
    env = {**os.environ, "HF_MODULES_CACHE": str(cwd / "hf-modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "llmconv", *map(str, args)], cwd=cwd, stdin=stdin,
                          capture_output=True, env=env, timeout=timeout, **kw)


# ---- model code (config.json auto_map, unknown model_type) -------------------------------------------


def test_convert_to_onnx_refuses_a_model_that_needs_its_own_code(cli_y, fx, marker, tmp_path):
    r = cli_y("convert", fx("remote-code-model"), tmp_path / "x.onnx")
    _refused(r, marker, "remote-code-model", "evil.py: EvilConfig, EvilForCausalLM", "'evil_llama'")
    assert not (tmp_path / "x.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_verify_outputs_refuses_it_before_loading_either_side(cli_y, fx, marker):
    src = fx("remote-code-model")
    r = cli_y("verify", src, src, "--mode", "outputs")
    _refused(r, marker, "evil.py")


def test_verify_json_error_names_the_file(cli_y, fx, marker):
    src = fx("remote-code-model")
    r = cli_y("verify", src, src, "--mode", "outputs", "--json")
    assert r.exit_code == 2 and not marker.exists()
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["error"]["code"] == 2 and "evil.py" in out["error"]["message"]


def test_quantize_refuses_it_before_the_export(cli_y, fx, marker, tmp_path):
    r = cli_y("quantize", fx("remote-code-model"), tmp_path / "q.onnx", "--target", "cpu")
    _refused(r, marker, "evil.py")
    assert not (tmp_path / "q.onnx").exists()


def test_prune_refuses_it_at_the_quality_check_and_writes_nothing(cli_y, fx, marker, tmp_path):
    r = cli_y("prune", fx("remote-code-model"), tmp_path / "pruned", "--sparsity", "0.1")
    _refused(r, marker, "evil.py")
    assert not (tmp_path / "pruned").exists()


def test_its_weights_still_convert_without_running_anything(cli_y, fx, marker, tmp_path):
    r = cli_y("convert", fx("remote-code-model"), tmp_path / "w.safetensors")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "w.safetensors").is_file() and not marker.exists()


def test_a_builtin_model_type_with_a_stray_auto_map_uses_the_builtin_class(cli_y, fx, marker, tmp_path):
    src = fx("remote-code-stray-automap")
    r = cli_y("convert", src, tmp_path / "x.onnx", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["verification"]["ok"] and (tmp_path / "x.onnx").is_file()
    r = cli_y("verify", src, tmp_path / "x.onnx", "--mode", "outputs")
    assert r.exit_code == 0, r.stderr
    assert not marker.exists() and PROMPT not in r.stdout + r.stderr


def test_an_unknown_model_type_without_auto_map_is_unsupported_not_a_crash(cli, fx, tmp_path):
    src = fx("remote-unknown-model-type")
    for args in (("convert", src, tmp_path / "x.onnx"), ("verify", src, src, "--mode", "outputs")):
        r = cli(*args)
        assert r.exit_code == 2, r.stderr
        assert "does not know model_type 'not_a_real_arch' (config.json)" in r.stderr
    assert not (tmp_path / "x.onnx").exists()


# ---- tokenizer code (tokenizer_config.json auto_map) --------------------------------------------------


def test_verify_text_refuses_a_tokenizer_that_needs_its_own_code(cli_y, fx, marker):
    src = fx("remote-code-tokenizer")
    r = cli_y("verify", src, src, "--mode", "outputs", "--text", fx("remote-code-text"))
    _refused(r, marker, "tokenizer_config.json", "evil_tokenizer.py: EvilTokenizer", "'EvilTokenizer'")


def test_prune_text_refuses_it_before_pruning(cli_y, fx, marker, tmp_path):
    r = cli_y("prune", fx("remote-code-tokenizer"), tmp_path / "pruned", "--sparsity", "0.1",
              "--text", fx("remote-code-text"))
    _refused(r, marker, "evil_tokenizer.py")
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize("flags", [("--text",), ("--method", "int8-static", "--calibration")],
                         ids=["text", "calibration"])
def test_quantize_text_and_calibration_refuse_it_up_front(cli_y, fx, marker, tmp_path, flags):
    src = fx("remote-code-tokenizer")
    r = cli_y("quantize", src, tmp_path / "q.onnx", "--target", "cpu", *flags, fx("remote-code-text"))
    _refused(r, marker, f"{src}: tokenizer_config.json", "evil_tokenizer.py")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_its_model_still_exports_without_the_tokenizer_code(cli_y, fx, marker, tmp_path):
    r = cli_y("convert", fx("remote-code-tokenizer"), tmp_path / "onnx", "--to", "onnx")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "onnx" / "model.onnx").is_file() and not marker.exists()


# ---- the real process: a closed stdin, a terminal ------------------------------------------------------


def test_real_process_with_stdin_closed_exits_2(fx, tmp_path, marker):
    r = _subprocess(["convert", fx("remote-code-model"), "x.onnx"], cwd=tmp_path, stdin=subprocess.DEVNULL)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert NEVER in err and "evil.py" in err and PROMPT not in err + r.stdout.decode()
    assert not marker.exists() and not (tmp_path / "x.onnx").exists()
    assert not (tmp_path / "hf-modules" / "transformers_modules").exists()  # transformers never copied it in


def test_real_process_on_a_terminal_never_prompts(fx, tmp_path, marker):
    main, term = pty.openpty()
    try:
        os.write(main, b"y\n")  # typed ahead: read only if something asked
        src = fx("remote-code-tokenizer")
        r = _subprocess(["verify", src, src, "--mode", "outputs", "--text", fx("remote-code-text")], cwd=tmp_path,
                        stdin=term)
    finally:
        os.close(term)
        os.close(main)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert NEVER in err and "evil_tokenizer.py" in err and PROMPT not in err + r.stdout.decode()
    assert not marker.exists()


# ---- item 8: onnxruntime's message is not UTF-8 -------------------------------------------------------


def test_non_utf8_onnxruntime_message_is_exit_2_naming_the_file(cli, fx):
    d = fx("ort-non-utf8-op")
    r = cli("verify", d / "good", d / "bad", "--mode", "outputs", "--inputs", d / "inputs.npz", "--json")
    assert r.exit_code == 2, r.stderr
    out = json.loads(r.stdout)  # nothing but the JSON object on stdout (no onnxruntime "EP Error" banner)
    msg = out["error"]["message"]
    # The reader refuses the graph before onnxruntime sees it (whose own message about it was not UTF-8).
    assert msg.startswith(f"{d / 'bad' / 'model.onnx'}: model.graph.node[0].op_type holds b'\\xff")
    assert "not valid UTF-8" in msg


# ---- Python that transformers imports without any auto_map: custom_generate/ (audit of issue 7) -----------


def _text_flags(fx, tmp_path):
    text = fx("remote-code-text")
    return {
        "verify": lambda src: ("verify", src, src, "--mode", "outputs", "--text", text),
        "convert-onnx": lambda src: ("convert", src, tmp_path / "x.onnx", "--to", "onnx"),
        "quantize-text": lambda src: ("quantize", src, tmp_path / "q.onnx", "--target", "cpu", "--text", text),
        "quantize-calibration": lambda src: ("quantize", src, tmp_path / "c.onnx", "--target", "cpu", "--method",
                                             "int8-static", "--calibration", text),
        "prune-text": lambda src: ("prune", src, tmp_path / "pruned", "--sparsity", "0.1", "--text", text),
    }


@pytest.mark.parametrize("command", ["verify", "convert-onnx", "quantize-text", "quantize-calibration",
                                     "prune-text"])
def test_custom_generate_in_a_model_folder_never_runs(cli_y, fx, marker, tmp_path, command):
    src = fx("remote-custom-generate")
    r = cli_y(*_text_flags(fx, tmp_path)[command](src), "--json")
    assert r.exit_code == 0, r.stderr
    assert not marker.exists() and PROMPT not in r.stdout + r.stderr
    notes = json.dumps(json.loads(r.stdout))
    assert f"left out of what transformers reads: custom_generate/ ({NEVER})" in notes


def test_an_onnx_folder_carries_no_python_from_the_model(cli_y, fx, marker, tmp_path):
    r = cli_y("convert", fx("remote-custom-generate"), tmp_path / "onnx", "--to", "onnx")
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "onnx"
    assert (out / "model.onnx").is_file() and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.rglob("*.py")) and not (out / "custom_generate").exists() and not marker.exists()


def test_real_process_custom_generate_with_stdin_closed(fx, tmp_path, marker):
    src = fx("remote-custom-generate")
    r = _subprocess(["verify", src, src, "--mode", "outputs"], cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr.decode()
    assert not marker.exists() and not (tmp_path / "hf-modules" / "transformers_modules").exists()


def test_views_are_named_by_pid_and_a_dead_process_leftover_is_removed(cli, fx, tmp_path, monkeypatch):
    import tempfile

    from llmconv.io import _HOST

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = 2**22 + 12345  # above the default pid_max: no live process has it
    stale = tmp_path / f".llmconv-view.llmconv-scratch-{dead}-{_HOST}-abc123"
    stale.mkdir()
    (stale / "config.json").symlink_to(fx("remote-custom-generate") / "config.json")
    alive = tmp_path / f".llmconv-view.llmconv-scratch-{os.getpid()}-{_HOST}-keep"  # a live run's: kept
    alive.mkdir()
    src = fx("remote-custom-generate")
    r = cli("verify", src, src, "--mode", "outputs")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name]
