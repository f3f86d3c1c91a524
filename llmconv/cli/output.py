"""Rendering: rich tables and progress on a terminal, one JSON object with --json."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.table import Table

from llmconv.io import strict_json


class _Console(Console):
    """Off a terminal (CI logs, pipes, make) rich lays tables out in 80 columns; logs are wider.

    ``COLUMNS`` still wins, read when printing as rich does.
    """

    def _wide(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self._width is None and not self.is_terminal and "COLUMNS" not in os.environ:
            return ConsoleDimensions(max(size.width, 120), size.height)
        return size

    size = property(_wide, Console.size.fset)

    def _stream(self) -> Any:
        stream = Console.file.fget(self)
        return _AsciiSafe(stream) if _narrow(stream) else stream

    file = property(_stream, Console.file.fset)


# Symbols our human output uses, as ASCII for a stream that cannot encode them (PYTHONIOENCODING=ascii,
# a latin-1 terminal); anything else such a stream cannot take is written as its escape (a tensor's name).
_ASCII = str.maketrans({"·": "-", "…": "...", "—": "--", "–": "-", "•": "*"})


def _narrow(stream: Any) -> bool:
    """Whether ``stream`` cannot encode the symbols of our human output."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        "·…".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return True
    return False


class _AsciiSafe:
    """A text stream that writes what its encoding cannot hold as ASCII symbols or escapes, never raising
    UnicodeEncodeError (a successful verify used to exit 3 on the "·" of its summary under LC_ALL=C)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.encoding = getattr(stream, "encoding", None) or "ascii"

    def write(self, text: str) -> int:
        safe = text.translate(_ASCII).encode(self.encoding, "backslashreplace").decode(self.encoding)
        return self._stream.write(safe)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno: the stream's own
        return getattr(self._stream, name)


out = _Console(highlight=False, soft_wrap=True)
err = _Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(obj: dict[str, Any]) -> None:
    # Strict JSON: Python would write bare Infinity/NaN (a max_abs against a NaN, say), which
    # JSON.parse, Go and serde reject; non-finite numbers are written as the strings "inf"/"-inf"/"nan".
    sys.stdout.write(json.dumps(strict_json(obj), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def emit_error(command: str, code: int, message: str, *, as_json: bool, report: Any = None, result: Any = None,
               kept: Any = None, quiet: bool = False) -> None:
    """The one red line on stderr (and, with --json, the command's JSON object with ``error`` on stdout).

    Args:
        command: the command's name (``quantize``); "" for the root.
        code: the exit code.
        message: the error's one line.
        as_json: print the JSON object too.
        report: the verification that failed (``NotEquivalent.report``), shown above the line or, in JSON,
            nested under ``verification`` (it is the whole body for ``verify``).
        result: the command's own report as far as it got (``NotEquivalent.result``); by default that of the
            exception being handled (:func:`llmconv.cli.app.guarded` calls this from its ``except`` clauses).
        kept: where ``--keep-failed`` kept the failed output (``NotEquivalent.kept``); by default likewise.
        quiet: ``--quiet``: the line alone, without the report's table above it.
    """
    from llmconv.errors import LlmconvError

    handled = sys.exc_info()[1]
    if isinstance(handled, LlmconvError):
        result = result if result is not None else getattr(handled, "result", None)
        kept = kept if kept is not None else getattr(handled, "kept", None)
    _run["error"] = (command, code, message)
    if as_json:
        print_json(failure_json(command, code, message, report=report, result=result, kept=kept))
    elif not quiet and report is not None and hasattr(report, "checks"):
        from llmconv.cli.verify_cmd import render_report

        render_report(report, console=err)
    err.print(f"[bold red]error:[/] {escape(message)}")


def run_recorded(command: str, call: Callable[[], Any], *, junit: Path | None, keep: Path | None, t0: float,
                 summary: Callable[[Any], str], failed: Callable[[Any], None] | None = None) -> Any:
    """Run a writing command's library call (convert, quantize, prune) inside ``--keep-failed``'s block, and
    record it in ``--junit``: the passing step with ``summary(report)``, or on exit 1 the failed step and its
    checks (``failed(error)`` is called first).

    Returns:
        What ``call`` returned.
    """
    from llmconv.errors import NotEquivalent
    from llmconv.io import keep_failed

    try:
        with keep_failed(keep):
            report = call()
    except NotEquivalent as e:
        if failed is not None:
            failed(e)
        if junit is not None:
            from llmconv.verification.junit import write_command_junit

            write_command_junit(junit, command=command, result=e.result, verification=e.report, error=str(e),
                                seconds=time.perf_counter() - t0)
        raise
    if junit is not None:
        from llmconv.verification.junit import write_command_junit

        write_command_junit(junit, command=command, result=report, seconds=time.perf_counter() - t0,
                            summary=summary(report))
    return report


def failure_json(command: str, code: int, message: str, *, report: Any = None, result: Any = None,
                 kept: Any = None) -> dict[str, Any]:
    """A command's JSON object on a failed exit: the same keys as on success (its module's ``JSON_FIELDS``), with
    what is known (``result``'s fields, the failed ``report`` under ``verification``) and None for the rest, then
    ``error: {code, message, kept}``."""
    obj: dict[str, Any] = {"schema": f"llmconv.{command}/1" if command else "llmconv/1", "ok": False}
    obj.update(dict.fromkeys(json_fields(command)))
    own = result.to_json() if result is not None and hasattr(result, "to_json") else None
    # Another command's report (quantize of an hf folder failing its export's check carries convert's) is not
    # this command's body: its verification is nested as any failed report is.
    if own is not None and own.get("schema") == obj["schema"]:
        obj.update(own)
    elif report is not None and hasattr(report, "to_json"):
        if command == "verify":
            obj.update(report.to_json())
        else:
            obj["verification"] = report.to_json()
    if "seconds" in obj and obj["seconds"] is None and _run["t0"] is not None:
        obj["seconds"] = round(time.perf_counter() - _run["t0"], 3)
    if code == 1 and "verified" in obj:
        obj["verified"] = False  # exit 1: the output failed its verification, whoever's report is here
    obj["ok"] = False
    obj["error"] = {"code": code, "message": message, "kept": None if kept is None else str(kept)}
    return obj


def json_fields(command: str) -> tuple[str, ...]:
    """The top-level keys of ``command``'s JSON object besides ``schema``, ``ok`` and ``error`` (its module's
    ``JSON_FIELDS``); empty for a command that declares none."""
    if not command.isidentifier():
        return ()
    import importlib

    try:
        module = importlib.import_module(f"llmconv.cli.{command}_cmd")
    except ImportError:
        return ()
    return tuple(getattr(module, "JSON_FIELDS", ()))


# The run in progress: when it started (set by the root command) and the last error reported, for the
# --junit record of a run that ended without a report and for the seconds of a failed run's JSON.
_run: dict[str, Any] = {"t0": None, "error": None}


def run_started() -> None:
    """Mark the start of a run (one command line)."""
    _run.update(t0=time.perf_counter(), error=None)


def run_seconds() -> float:
    """Seconds since :func:`run_started` (0 if it was not called)."""
    return time.perf_counter() - _run["t0"] if _run["t0"] is not None else 0.0


def last_error() -> tuple[str, int, str] | None:
    """``(command, code, message)`` of the last error reported in this run, or None."""
    return _run["error"]


# What a terminal would act on instead of showing: C0 controls (ESC starts colour, cursor and title
# sequences; CR and LF would forge or hide lines), DEL, C1 controls (0x9b is a one-byte ESC [), and the
# bidirectional overrides that display text in another order than it is stored.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with each control character written as its escape (``\\x1b``, ``\\n``, ``\\u202e``).

    For human output of names and paths taken from files (tensor names, metadata, error lines): a tensor
    called ``"\\x1b[2J"`` must not clear the user's screen. ``--json`` keeps the exact names.
    """
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def escape(text: str) -> str:
    """``text`` for rich: control characters made visible (:func:`printable`), markup escaped."""
    from rich.markup import escape as _escape

    return _escape(printable(text))


@contextlib.contextmanager
def status_display(*, enabled: bool, starting: str | None = None) -> Iterator[None]:
    """Show what the library reports (:mod:`llmconv.progress`) on stderr for the block: a spinner, the step
    and its seconds, and a bar in bytes under it while a writer counts them. Only on a terminal and when
    ``enabled`` (not ``--json`` nor ``--quiet``); elsewhere nothing is installed and nothing is written. The
    display is transient: it is there only while a step is open, and leaves no line behind.

    ``starting``: a status shown at once, until the library's first report (the heavy imports come first, and
    take seconds); only for a command whose library call always reports, and reports before it returns."""
    from llmconv import progress

    if not enabled or not err.is_terminal:
        yield
        return
    shown = _Status(err)
    if starting:
        shown.status(starting)
        shown.waiting = True
    try:
        with progress.reporting(shown):
            yield
    finally:
        shown.close()


class _Status:
    """The reporter the CLI installs: one rich ``Progress`` (a status row, a byte bar when one is open),
    started when a step opens and stopped (erased) when none is left, so that the command's own output
    never prints under a live display."""

    def __init__(self, console: Console) -> None:
        import threading

        self._console = console
        self._lock = threading.RLock()
        self._live: Any = None
        self._row: Any = None  # the status task
        self._bar: Any = None  # the byte-count task
        self.waiting = False  # the row is the CLI's own "starting" status, until the library reports

    def _start(self) -> Any:
        if self._live is None:
            from rich.progress import Progress, SpinnerColumn

            text, bar, size, seconds = _columns(self._console)
            # A terminal that cannot show braille dots gets a spinner in ASCII.
            spinner = SpinnerColumn("line" if _narrow(self._console.file) else "dots")
            # stdout is not redirected: it carries the command's output (and --json's object), never this.
            self._live = Progress(spinner, text(), bar(), size(), seconds(), console=self._console,
                                  transient=True, redirect_stdout=False, redirect_stderr=True,
                                  refresh_per_second=8)
            self._live.start()
        return self._live

    def _stop_if_idle(self) -> None:
        if self._live is not None and self._row is None and self._bar is None:
            self._live.stop()
            self._live = None

    def _drop_waiting(self) -> None:
        if self.waiting:
            self.waiting = False
            if self._row is not None and self._live is not None:
                self._live.remove_task(self._row)  # a new row: its seconds count from the library's first step
            self._row = None

    def status(self, text: str | None) -> None:
        with self._lock:
            self._drop_waiting()
            if text is None:
                if self._row is not None and self._live is not None:
                    self._live.remove_task(self._row)
                self._row = None
                self._stop_if_idle()
                return
            live = self._start()
            # Drawn at once: a step shorter than a refresh is still seen (and a test can see it).
            if self._row is None:
                self._row = live.add_task(escape(text), total=None)
                live.refresh()
            else:
                live.update(self._row, description=escape(text), refresh=True)

    def bytes_started(self, total: int, label: str) -> None:
        with self._lock:
            self._drop_waiting()
            live = self._start()
            if self._bar is not None:
                live.remove_task(self._bar)
            self._bar = live.add_task(escape(label), total=total, bytes=True)

    def bytes_advanced(self, n: int) -> None:
        with self._lock:
            if self._bar is not None and self._live is not None:
                self._live.update(self._bar, advance=n)

    def bytes_done(self) -> None:
        with self._lock:
            if self._bar is not None and self._live is not None:
                self._live.remove_task(self._bar)
            self._bar = None
            self._stop_if_idle()

    def close(self) -> None:
        with self._lock:
            self._row = self._bar = None
            self._stop_if_idle()


def _columns(console: Console) -> tuple[Any, ...]:
    """The display's columns (rich.progress is imported only when something is shown): the text; for a byte
    count, its bar, bytes and speed; the seconds since the row began."""
    from rich.progress import BarColumn, DownloadColumn, ProgressColumn, TransferSpeedColumn
    from rich.text import Text

    class Description(ProgressColumn):
        def render(self, task: Any) -> Any:
            text = Text.from_markup(task.description, overflow="ellipsis")
            text.no_wrap = True
            # Too long for the line: its start goes, not its end, where the step counter changes.
            room = console.width - (60 if task.fields.get("bytes") else 12)
            if room > 10 and len(text) > room:
                text = Text("...") + text[len(text) - room + 3:]
            return text

    class Bar(BarColumn):
        def render(self, task: Any) -> Any:
            return super().render(task) if task.fields.get("bytes") else Text("")

    class Bytes(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self._size, self._speed = DownloadColumn(), TransferSpeedColumn()

        def render(self, task: Any) -> Any:
            if not task.fields.get("bytes"):
                return Text("")
            return Text.assemble(self._size.render(task), " ", self._speed.render(task))

    class Seconds(ProgressColumn):
        def render(self, task: Any) -> Any:
            return Text(f"{task.elapsed or 0:.0f} s", style="progress.elapsed")

    return Description, Bar, Bytes, Seconds


def kv_table(rows: list[tuple[str, Any]], *, title: str | None = None) -> Table:
    t = Table(show_header=False, box=None, title=title, title_justify="left", pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    return t


def fmt_num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x == 0:
            return "0"
        return f"{x:.4g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.2e}"
    return str(x)
