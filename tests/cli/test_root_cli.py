"""The program itself: --version, shell completion, and output on a terminal that cannot encode our symbols."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINED = ROOT / "fixtures" / "models" / "trained-gpt2"


def llmconv(*args: object, env: dict[str, str] | None = None, encoding: str = "utf-8") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmconv", *map(str, args)], cwd=ROOT, capture_output=True,
                          encoding=encoding, env={**os.environ, **(env or {})}, timeout=300)


def test_version_needs_no_command():
    from llmconv import __version__

    r = llmconv("--version")
    assert r.returncode == 0 and r.stdout == f"llmconv {__version__}\n" and r.stderr == ""


def test_shell_completion_completes_commands_and_flags():
    # The script for a named shell (--show-completion detects the shell from the parent processes, which a test
    # run outside a shell, under nohup or CI's runner, does not have: "Shell  not supported").
    r = llmconv(env={"_LLMCONV_COMPLETE": "source_bash"})
    assert r.returncode == 0 and "complete" in r.stdout and "_LLMCONV_COMPLETE" in r.stdout
    ask = {"_LLMCONV_COMPLETE": "complete_bash", "COMP_WORDS": "llmconv qu", "COMP_CWORD": "1"}
    r = subprocess.run([sys.executable, "-c", "from llmconv.cli.app import main; main()"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, **ask}, timeout=60)
    assert r.stdout.split() == ["quantize"]
    ask.update(COMP_WORDS="llmconv verify a b --dec", COMP_CWORD="4")
    r = subprocess.run([sys.executable, "-c", "from llmconv.cli.app import main; main()"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, **ask}, timeout=60)
    assert r.stdout.split() == ["--decode-steps"]


@pytest.mark.parametrize("encoding", ["ascii"])
def test_human_output_never_fails_on_the_terminal_encoding(encoding, tmp_path):
    env = {"PYTHONIOENCODING": encoding, "COLUMNS": "120"}
    r = llmconv("verify", TRAINED, TRAINED, env=env, encoding=encoding)
    assert r.returncode == 0, r.stderr
    assert "weights - profile exact - 28 checks, 28 bit-exact" in r.stdout
    # A name the encoding cannot hold is written as its escape, in the one error line.
    odd = tmp_path / "modèle→.bin"
    r = llmconv("inspect", odd, env=env, encoding=encoding)
    assert r.returncode == 2 and "internal error" not in r.stderr
    assert ("mod\\xe8le\\u2192.bin" if encoding == "ascii" else "modèle\\u2192.bin") in r.stderr, r.stderr
