"""The status of long steps (llmconv.progress): shown on a terminal, never with --json, --quiet or a pipe; a byte
count's total is what is written."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from llmconv import progress
from tests.export import _exports

ROOT = Path(__file__).resolve().parents[2]
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Recorder:
    """A reporter that keeps what it receives."""

    def __init__(self) -> None:
        self.lines: list[str | None] = []
        self.counts: list[dict] = []

    def status(self, text: str | None) -> None:
        self.lines.append(text)

    def bytes_started(self, total: int, label: str) -> None:
        self.counts.append({"total": total, "label": label, "advanced": 0, "done": False})

    def bytes_advanced(self, n: int) -> None:
        self.counts[-1]["advanced"] += n

    def bytes_done(self) -> None:
        self.counts[-1]["done"] = True


def _env() -> dict[str, str]:
    return {**os.environ, "TERM": "xterm-256color", "LLMCONV_ORT_THREADS": "1"}


def _start(args: list[object], *, terminal: bool) -> tuple[subprocess.Popen, int | None]:
    """Start ``llmconv ARGS`` with stderr on a pseudo-terminal (200 columns), or on a pipe."""
    cmd = [sys.executable, "-m", "llmconv", *map(str, args)]
    if not terminal:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE), None
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    return proc, master


def _finish(proc: subprocess.Popen, master: int | None, timeout: float = 240) -> tuple[int, str, str]:
    """Wait for the run; (exit code, stdout, stderr as the terminal or the pipe got it, escapes removed)."""
    if master is None:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(), err.decode()
    got = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:  # drained as it comes: a full terminal buffer would block the child
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                got += chunk
            elif proc.poll() is not None:
                break
        out = proc.stdout.read()
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        os.close(master)
    return proc.returncode, out.decode(), _ESCAPES.sub("", got.decode(errors="replace"))


def test_export_and_verify_show_their_steps_on_a_terminal(fx, fixtures_dir, tmp_path):
    exported = _exports.export(fixtures_dir, fx, "llama-hf")[0]  # shared with the verification tests
    converting = _start(["convert", fx("llama-hf"), tmp_path / "llama-onnx", "--to", "onnx"], terminal=True)
    verifying = _start(["verify", fx("llama-hf"), exported], terminal=True)
    code, out, shown = _finish(*converting)
    assert code == 0, shown
    assert "converted" in out and "verified" in out
    for text in ("preparing the ONNX export (optimum)", "exporting to ONNX (optimum)",
                 "finishing the graph (external data, IR version)", "verifying the export against PyTorch",
                 "reference (PyTorch)", "candidate (onnxruntime)", "sample 1/3", "decoding greedily"):
        assert text in shown, text
    assert re.search(r"\d+ s", shown)  # the step's seconds
    assert "converted" not in shown  # the report is on stdout, not under the status

    code, out, shown = _finish(*verifying)
    assert code == 0, shown
    assert "EQUIVALENT: all" in out
    for text in ("reading both models' signatures", "reference (PyTorch) · loading llama-hf",
                 "candidate (onnxruntime) · sample 2/3", "decoding the reference's tokens · step 1/",
                 "recomputing the decoded steps without the cache"):
        assert text in shown, text
    assert "reference (PyTorch)" not in out


def test_no_status_with_json_quiet_or_a_pipe(fx, tmp_path):
    src = fx("llama.safetensors")
    started = {
        "terminal": _start(["convert", src, tmp_path / "a.safetensors", "--dtype", "bf16"], terminal=True),
        "json": _start(["convert", src, tmp_path / "b.safetensors", "--dtype", "bf16", "--json"], terminal=True),
        "quiet": _start(["convert", src, tmp_path / "c.safetensors", "--dtype", "bf16", "--quiet"], terminal=True),
        "pipe": _start(["convert", src, tmp_path / "d.safetensors", "--dtype", "bf16"], terminal=False),
    }
    done = {name: _finish(*p) for name, p in started.items()}
    assert all(code == 0 for code, _, _ in done.values()), done
    shown = done["terminal"][2]
    for text in ("starting convert", "reading llama.safetensors", "writing a.safetensors (bf16)", "bytes written",
                 "verifying a.safetensors against the source", "bytes compared"):
        assert text in shown, text
    assert done["json"][1].startswith("{") and done["json"][2] == ""
    assert done["quiet"][1] == "" and done["quiet"][2] == ""
    assert "converted" in done["pipe"][1] and done["pipe"][2] == ""


@pytest.mark.parametrize("shard", [None, "150KB"])
def test_a_cast_counts_the_bytes_it_writes(fx, tmp_path, shard):
    from llmconv import convert

    src = fx("llama-hf") if shard else fx("llama.safetensors")
    dst = tmp_path / ("out" if shard else "out.safetensors")
    seen = Recorder()
    with progress.reporting(seen):
        report = convert(src, dst, dtype="bf16", shard_size=shard)
    written, compared = seen.counts
    weights = sorted(dst.glob("model*.safetensors")) if shard else [dst]
    assert len(weights) == (3 if shard else 1)
    assert written["done"] and written["label"] == ("3 shards" if shard else "bytes written")
    assert written["total"] == written["advanced"] == sum(p.stat().st_size for p in weights)
    # Half the float32 source: the count is what the cast writes, not what the source holds.
    assert written["total"] < 0.51 * sum(i.nbytes for i in _infos(src))
    assert compared["done"] and compared["total"] == compared["advanced"] == report.parameters * 2
    assert seen.lines[-1] is None  # every step closed


def _infos(path: Path) -> list:
    from llmconv.formats import registry

    with registry.open_checkpoint(path) as s:
        return [s.infos[n] for n in s.canonical_names()]


def test_progress_api_nests_and_costs_nothing_without_a_reporter():
    with progress.phase("exporting"):
        progress.step(1, 2, "sample")
        progress.note("anything")
        assert progress._open == []  # nothing kept when nobody listens
    calls: list[int] = []
    with progress.bytes(10, "x") as advance:
        advance(4)
    with progress.bytes(10, "x", also=calls.append) as advance:
        advance(4)  # a caller's own callback still gets the bytes
    assert calls == [4]

    seen = Recorder()
    with progress.reporting(seen):
        with progress.phase("verifying"):
            progress.step(2, 3, "sample")
            with progress.phase("decoding"):
                progress.note("step 1/5")
                with progress.bytes(8, "outer") as outer, progress.bytes(8, "inner") as inner:
                    outer(8)
                    inner(8)  # the outer count has these bytes: the inner one reports nothing
            progress.note("sample 3/3")
        progress.note("outside any step")  # dropped: no step would end it
    assert seen.lines == ["verifying", "verifying · sample 2/3", "verifying · decoding",
                          "verifying · decoding · step 1/5", "verifying", "verifying · sample 3/3", None]
    assert seen.counts == [{"total": 8, "label": "outer", "advanced": 8, "done": True}]
    assert progress._reporter is None and progress._open == []
