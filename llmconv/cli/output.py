"""Rendering: rich tables and progress on a terminal, one JSON object with --json."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.table import Table


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


out = _Console(highlight=False, soft_wrap=True)
err = _Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(obj: dict[str, Any]) -> None:
    # Strict JSON: Python would write bare Infinity/NaN (a max_abs against a NaN, say), which
    # JSON.parse, Go and serde reject; non-finite numbers are written as the strings "inf"/"-inf"/"nan".
    sys.stdout.write(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def emit_error(command: str, code: int, message: str, *, as_json: bool, report: Any = None) -> None:
    """The one red line on stderr (and, with --json, the error object on stdout)."""
    if as_json:
        obj: dict[str, Any] = {}
        if report is not None and hasattr(report, "to_json"):
            obj.update(report.to_json())
        schema = f"llmconv.{command}/1" if command else "llmconv/1"
        obj.update({"schema": schema, "ok": False, "error": {"code": code, "message": message}})
        print_json(obj)
    else:
        if report is not None and hasattr(report, "checks"):
            from llmconv.cli.verify_cmd import render_report

            render_report(report, console=err)
    err.print(f"[bold red]error:[/] {escape(message)}")


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
def byte_progress(total: int, description: str, *, enabled: bool) -> Iterator[Any]:
    """A progress bar in bytes on stderr, shown only on a terminal; yields an ``advance(n)`` callable."""
    if not enabled or not err.is_terminal or total <= 0:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task(escape(description), total=total)  # a file name: plain text, shown escaped

        def advance(n: int) -> None:
            bar.update(task, advance=n)

        yield advance


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
