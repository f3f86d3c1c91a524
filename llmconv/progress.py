"""What a long step is doing, for whoever shows it: the library reports, the CLI renders.

The library never prints. Its long steps (an export, each verification sample, calibration, each
quantization attempt, a writer's bytes) say what they are doing here, and a reporter installed with
:func:`reporting` receives it. None is installed by default, and then every call does nothing (one
global read), so a Python caller of ``llmconv.convert`` sees no output and pays nothing. Modules whose
functions take a ``progress`` callback of their own import this one as ``status``.

Example:
    >>> with phase("verifying the export"):
    ...     for i, feed in enumerate(feeds, 1):
    ...         step(i, len(feeds), "sample")       # "verifying the export · sample 2/3"
    >>> with bytes(total, "writing model.safetensors") as advance:
    ...     advance(len(chunk))
"""

from __future__ import annotations

import builtins
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

__all__ = ["Reporter", "bytes", "note", "phase", "reporting", "step"]

SEPARATOR = " · "


class Reporter(Protocol):
    """What receives the reports. Calls may come from writer threads; the text is plain (no markup)."""

    def status(self, text: str | None) -> None:
        """The current status line (the open phases, outermost first, joined by ``SEPARATOR``); None when
        none is open."""

    def bytes_started(self, total: int, label: str) -> None:
        """A byte count begins: ``total`` bytes will be written (or read), under ``label``."""

    def bytes_advanced(self, n: int) -> None:
        """``n`` more bytes of the open count are done."""

    def bytes_done(self) -> None:
        """The open byte count ended (complete, or left by an error)."""


_reporter: Reporter | None = None
_lock = threading.RLock()
_open: list[list[str]] = []  # the open phases: [text, note] each, outermost first
_counting = [False]  # whether a byte count is open: a nested one reports nothing


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Send the reports made inside the block to ``reporter`` (None: to nobody).

    Process-wide rather than per context: the writers report from their own threads.
    """
    global _reporter
    with _lock:
        saved, saved_open, saved_counting = _reporter, _open[:], _counting[0]
        _reporter, _open[:], _counting[0] = reporter, [], False
    try:
        yield
    finally:
        with _lock:
            _reporter, _open[:], _counting[0] = saved, saved_open, saved_counting


def _line() -> str | None:
    parts = [p for text, extra in _open for p in (text, extra) if p]
    return SEPARATOR.join(parts) if parts else None


def _show(reporter: Reporter) -> None:
    reporter.status(_line())


@contextlib.contextmanager
def phase(text: str) -> Iterator[None]:
    """A step that may take a while: shown (after the phases it is nested in) until the block ends."""
    reporter = _reporter
    if reporter is None:
        yield
        return
    with _lock:
        entry = [text, ""]
        if _open:
            _open[-1][1] = ""  # the outer phase's note ("sample 3/3") said where it was before this step
        _open.append(entry)
        _show(reporter)
    try:
        yield
    finally:
        with _lock:
            at = [i for i, e in enumerate(_open) if e is entry]
            del _open[at[-1] if at else len(_open):]  # with any step left open inside it
            _show(reporter)


def note(text: str) -> None:
    """Say where the innermost open phase is (``"sample 2/3"``, ``"attempt 2: per-channel"``); outside any
    phase it is dropped (a status that no block ends would outlive the step)."""
    reporter = _reporter
    if reporter is None:
        return
    with _lock:
        if not _open:
            return
        _open[-1][1] = text
        _show(reporter)


def step(i: int, n: int, what: str) -> None:
    """``note(f"{what} {i}/{n}")``: item ``i`` (counted from 1) of ``n``."""
    if _reporter is not None:
        note(f"{what} {i}/{n}")


def _ignore(n: int) -> None:
    return None


@contextlib.contextmanager
def bytes(total: int, label: str, *, also: Callable[[int], None] | None = None  # noqa: A001  (progress.bytes)
          ) -> Iterator[Callable[[int], None]]:
    """A count of ``total`` bytes, for writers: yields ``advance(n)``, safe to call from any thread.

    ``total`` must be what the block really writes, so that a bar reaches its end. ``also`` (a caller's own
    ``progress`` callback) gets every ``n`` too. A count opened while another is open reports nothing to the
    reporter (the outer one counts those bytes).
    """
    reporter = _reporter
    if reporter is not None:
        with _lock:
            if _counting[0]:
                reporter = None
            _counting[0] = True
    if reporter is None:
        yield also or _ignore
        return
    shown = reporter.bytes_advanced

    def both(n: int) -> None:
        shown(n)
        also(n)  # type: ignore[misc]

    try:
        reporter.bytes_started(builtins.max(int(total), 0), label)
        try:
            yield shown if also is None else both
        finally:
            reporter.bytes_done()
    finally:
        with _lock:
            _counting[0] = False
