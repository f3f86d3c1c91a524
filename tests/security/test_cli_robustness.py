"""Issue 7, items 8, 9 and 13 (cli): bad input never ends in exit 3, signals are always honoured, and
names from files cannot drive the terminal.

- Item 8: JSON with a 5000-digit integer or 100,000 levels of nesting, config.json values of the wrong
  type, paths with NUL bytes, names too long for the filesystem and symbolic-link loops (given on the
  command line, or found in an index or ONNX file) are bad input: exit 2 and one line naming the file.
- Item 9: SIGINT/SIGTERM while the program starts print one line and exit 130/143 (no traceback, no
  silent death); a SIGTERM whose exception a library swallows still stops the run, and leaves nothing.
- Item 13: control characters in tensor names, metadata and paths are shown escaped in human output;
  --json keeps the exact names.

The signal tests run the real program; a sitecustomize.py (fixtures/hostile_cli.py) sends the signal at
a chosen import, so that the moment is the same on a slow machine as on a fast one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.hostile_cli import CONTROL_NAME, LONG_NAME, WRONG_TYPES

ROOT = Path(__file__).resolve().parents[2]
ESC = "\x1b"


def _one_line_naming(r, *names: str, code: int = 2) -> str:
    assert r.exit_code == code, r.stderr + r.stdout
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert "internal error" not in line and "Traceback" not in r.stderr
    for name in names:
        assert name in line, line
    return line


# ---- item 8: JSON the parser cannot take ------------------------------------------------------------


@pytest.mark.parametrize("name, file, words", [
    ("index-bigint", "model.safetensors.index.json", "more than 4300 digits"),
    ("index-deep", "model.safetensors.index.json", "nested too deeply"),
    ("config-bigint", "config.json", "more than 4300 digits"),
    ("config-deep", "config.json", "nested too deeply"),
])
def test_json_too_big_or_too_deep_is_corrupt_input(cli, fx, name, file, words):
    r = cli("inspect", fx(name))
    _one_line_naming(r, f"{name}/{file}", words)


@pytest.mark.parametrize("name, key", [(n, k if k != "text_config" else "text_config.num_attention_heads")
                                       for n, k, _ in WRONG_TYPES])
def test_a_config_value_of_the_wrong_type_is_named(cli, fx, name, key):
    line = _one_line_naming(cli("inspect", fx(name)), f"{name}/config.json", f"'{key}' must be")
    assert "fix the value or remove the key" in line


def test_torch_dtype_object_stops_convert_before_writing(cli, fx, tmp_path):
    dst = tmp_path / "out"
    r = cli("convert", fx("config-dtype-object"), dst, "--dtype", "bf16", "--no-verify")
    _one_line_naming(r, "config-dtype-object/config.json", "'torch_dtype' must be a string, not {}")
    assert list(tmp_path.iterdir()) == []


def test_the_json_error_object_carries_the_same_message(cli, fx):
    r = cli("inspect", fx("config-deep"), "--json")
    assert r.exit_code == 2
    err = json.loads(r.stdout)["error"]
    assert err["code"] == 2 and "config.json is nested too deeply" in err["message"]


# ---- item 8: paths no file operation can use ---------------------------------------------------------


@pytest.mark.parametrize("name, words", [
    ("index-nul-shard", "holds a NUL byte"),
    ("index-long-shard", "has a name too long for the filesystem"),
    ("index-loop-shard", "runs into symbolic links that loop"),
])
def test_bad_shard_names_in_an_index_are_corrupt_input(cli, fx, name, words):
    _one_line_naming(cli("inspect", fx(name)), f"{name}/model.safetensors.index.json", words)


@pytest.mark.parametrize("name, words", [
    ("onnx-external-nul", "holds a NUL byte"),
    ("onnx-external-long", "has a name too long for the filesystem"),
])
def test_bad_external_data_names_in_an_onnx_file_are_corrupt_input(cli, fx, name, words):
    _one_line_naming(cli("inspect", fx(name)), f"{name}/model.onnx", "external data file", words)


def test_a_nul_byte_in_an_argument_is_a_usage_error(cli, tmp_path):
    r = cli("inspect", "model\x00.safetensors")
    _one_line_naming(r, "PATH", "null byte")
    r = cli("convert", tmp_path, "out\x00put")
    _one_line_naming(r, "DST", "null byte")


def test_a_name_too_long_as_source_or_destination(cli, fx, tmp_path):
    long_src = tmp_path / LONG_NAME
    _one_line_naming(cli("inspect", long_src), LONG_NAME, "too long for the filesystem", "255 bytes")
    _one_line_naming(cli("inspect", long_src / "child"), "too long for the filesystem")
    r = cli("convert", fx("control-names.safetensors"), tmp_path / LONG_NAME)
    _one_line_naming(r, LONG_NAME, "too long for the filesystem")
    r = cli("convert", fx("control-names.safetensors"), tmp_path / "new" / LONG_NAME)  # its parent is made
    assert "too long" in _one_line_naming(r, LONG_NAME).lower()
    assert list(tmp_path.iterdir()) == []


def test_a_symlink_loop_as_source_destination_or_parent(cli, fx, tmp_path):
    loop = fx("symlink-loop") / "loop"
    _one_line_naming(cli("inspect", loop), "symlink-loop/loop", "symbolic links in this path loop")
    _one_line_naming(cli("inspect", loop / "model.safetensors"), "symbolic links in this path loop")
    _one_line_naming(cli("verify", fx("control-names.safetensors"), loop), "symbolic links in this path loop")
    r = cli("convert", fx("control-names.safetensors"), loop, "--force")
    _one_line_naming(r, "symlink-loop/loop", "fix or remove the link")
    assert os.readlink(loop) == "loop"


def test_a_missing_parent_or_a_file_as_parent_is_no_such_file(cli, fx, tmp_path):
    _one_line_naming(cli("inspect", tmp_path / "missing" / "model.safetensors"), "no such file or folder")
    under_a_file = fx("control-names.safetensors") / "model.safetensors"
    _one_line_naming(cli("inspect", under_a_file), "control-names.safetensors/model.safetensors",
                     "no such file or folder")


def test_library_detect_names_the_loop_and_the_missing_link_target(tmp_path):
    from llmconv.errors import InputError
    from llmconv.formats.registry import detect

    os.symlink("nowhere", tmp_path / "dangling")
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(InputError, match="a link to nothing"):
        detect(tmp_path / "dangling")
    with pytest.raises(InputError, match="loop"):
        detect(tmp_path / "loop")
    with pytest.raises(InputError, match="NUL byte"):
        detect(tmp_path / "a\x00b")


# ---- item 13: control characters in names -------------------------------------------------------------


def test_inspect_shows_control_characters_escaped(cli, fx):
    r = cli("inspect", fx("control-names.safetensors"))
    assert r.exit_code == 0, r.stderr
    assert ESC not in r.stdout and "\r" not in r.stdout and "\u202e" not in r.stdout and "\x07" not in r.stdout
    flat = r.stdout.replace("\n", "")
    assert "evil\\x1b[31mRED" in flat and "\\u202e" in flat and "note\\x1b[2J" in flat


def test_inspect_json_keeps_the_exact_names(cli, fx):
    r = cli("inspect", fx("control-names.safetensors"), "--json")
    assert r.exit_code == 0, r.stderr
    assert ESC not in r.stdout  # JSON escapes it as \u001b
    info = json.loads(r.stdout)
    assert CONTROL_NAME in [t["name"] for t in info["largest"]]
    assert info["metadata"]["note\x1b[2J"] == "value\x1b[5m"


def test_verify_tables_show_control_characters_escaped(cli, fx):
    r = cli("verify", fx("control-names.safetensors"), fx("control-names-changed.safetensors"))
    assert r.exit_code == 1, r.stderr + r.stdout
    shown = r.stdout + r.stderr
    assert ESC not in shown and "\u202e" not in shown and "\r" not in shown
    assert "evil\\x1b[31mRED" in shown.replace("\n", "")


def test_error_lines_show_control_characters_escaped(cli, tmp_path):
    r = cli("inspect", tmp_path / "no\x1b[2Jsuch\nfile")
    line = _one_line_naming(r, "no such file or folder")
    assert ESC not in r.stderr and "no\\x1b[2Jsuch\\nfile" in line


# ---- item 9: signals ------------------------------------------------------------------------------------


def _run(args: list[object], *, cwd: Path, site: Path | None = None, timeout: float = 120,
         **signal_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (site, ROOT) if p), **signal_env}
    env.pop("LLMCONV_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "llmconv", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sig, code, word", [("INT", 130, "interrupted"), ("TERM", 143, "terminated")])
def test_a_signal_while_the_program_starts_is_one_line(fx, tmp_path, sig, code, word):
    # typer is imported at start, before any command runs: a SIGINT there used to print a traceback of
    # the import, and a SIGTERM killed the process with no word at all.
    r = _run(["inspect", fx("control-names.safetensors")], cwd=tmp_path, site=fx("signal-site"),
             LLMCONV_TEST_SIGNAL_AT="typer", LLMCONV_TEST_SIGNAL=sig)
    assert r.returncode == code, r.stderr
    assert r.stderr == f"llmconv: {word}\n" and r.stdout == ""


@pytest.mark.parametrize("how", ["except", "finalizer"])
@pytest.mark.parametrize("sig, code, word", [("INT", 130, "interrupted"), ("TERM", 143, "terminated (SIGTERM)")])
def test_a_signal_a_library_swallows_still_stops_the_run(fx, tmp_path, sig, code, word, how):
    # The signal arrives while torch is being imported, inside a bare `except:` (mpmath has one around
    # its optional imports) or a finalizer: before the fix the conversion went on and exited 0 with its
    # output (and a finalizer printed "Exception ignored in ..." with a traceback).
    dst = tmp_path / "out.safetensors"
    start = time.monotonic()
    r = _run(["convert", fx("control-names.safetensors"), dst], cwd=tmp_path, site=fx("signal-site"),
             LLMCONV_TEST_SIGNAL_AT="torch", LLMCONV_TEST_SIGNAL=sig, LLMCONV_TEST_SWALLOW=how)
    assert r.returncode == code, r.stderr + r.stdout
    assert r.stderr.strip().splitlines() == [f"error: {word}; the destination was left as it was"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert time.monotonic() - start < 60


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_at_any_moment_of_a_conversion_is_honoured(fx, tmp_path, sig, code):
    """Randomised moments, from the first import to the end of an ONNX export and its verification."""
    src = fx("gpt2-hf")
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LLMCONV_DEBUG", None)
    for i in range(8):
        dst = tmp_path / f"o{i}.onnx"
        p = subprocess.Popen([sys.executable, "-m", "llmconv", "convert", src, dst], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.3, 2.5))  # after the interpreter's own startup, which no program controls
        p.send_signal(sig)
        out, err = p.communicate(timeout=180)
        if p.returncode == 0:  # finished before the signal came
            dst.unlink()
            continue
        assert p.returncode == code, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert sorted(x.name for x in tmp_path.iterdir()) == [], err


# ---- files transformers/optimum read: checked by llmconv first, the same in every command (audit) -------


_TF_BAD = [
    ("tf-index-list", "model.safetensors.index.json", "index has no valid 'weight_map' (tensor name -> shard file)"),
    ("tf-generation-config-deep", "generation_config.json",
     "generation_config.json is nested too deeply to read (more than 100 levels)"),
    ("tf-config-bom", "config.json",
     "config.json starts with a UTF-8 byte-order mark, which transformers cannot read "
     "(save the file as UTF-8 without the BOM)"),
    ("tf-config-vocab-huge", "config.json",
     "'vocab_size' must be a non-negative integer below 2**31, not 1000000000000000000000000000000"),
    ("tf-config-model-type-null", "config.json", "'model_type' must be a string, not null"),
]


@pytest.mark.parametrize("name, file, words", _TF_BAD, ids=[n for n, _, _ in _TF_BAD])
@pytest.mark.parametrize("command", ["verify-outputs", "convert-onnx"])
def test_what_transformers_reads_is_checked_first(cli, fx, tmp_path, name, file, words, command):
    src = fx(name)
    args = (("verify", fx("llama-hf"), src, "--mode", "outputs") if command == "verify-outputs"
            else ("convert", src, tmp_path / "x.onnx", "--to", "onnx"))
    _one_line_naming(cli(*args), f"{src / file}: {words}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bom_config_is_refused_by_inspect_and_convert_too(cli, fx, tmp_path):
    src = fx("tf-config-bom")
    for args in (("inspect", src), ("convert", src, tmp_path / "out")):
        _one_line_naming(cli(*args), f"{src / 'config.json'}: config.json starts with a UTF-8 byte-order mark")
    assert not (tmp_path / "out").exists()


def test_an_index_without_metadata_exports_as_it_converts(cli, fx, tmp_path):
    src = fx("tf-index-no-metadata")
    r = cli("convert", src, tmp_path / "x.onnx", "--to", "onnx", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["verification"]["ok"] and (tmp_path / "x.onnx").is_file()
    assert "metadata" not in json.loads((src / "model.safetensors.index.json").read_text())  # the source untouched


@pytest.mark.parametrize("command", ["verify-text", "quantize-calibration"])
def test_a_tokenizer_json_the_library_refuses_is_corrupt_input(cli, fx, tmp_path, command):
    src = fx("tf-tokenizer-json-wrong")
    text = fx("remote-code-text")
    args = (("verify", src, src, "--mode", "outputs", "--text", text) if command == "verify-text"
            else ("quantize", src, tmp_path / "q.onnx", "--target", "cpu", "--method", "int8-static",
                  "--calibration", text))
    _one_line_naming(cli(*args), f"{src / 'tokenizer.json'}: the tokenizers library cannot read the tokenizer: "
                                 "invalid type: integer `5`, expected a map")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_broken_tokenizer_does_not_stop_a_run_that_reads_no_tokenizer(cli, fx):
    src = fx("tf-tokenizer-json-wrong")
    r = cli("verify", src, src, "--mode", "outputs")
    assert r.exit_code == 0, r.stderr
