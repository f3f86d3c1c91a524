"""Typed errors raised by the library.

The library never prints and never exits. Every error carries a one-line message that names the
file or tensor at fault and what to do about it; only ``llmconv.cli`` turns an error into a red
line and an exit code (``exit_code`` below).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class LlmconvError(Exception):
    """Base class of every error the library raises on purpose.

    Args:
        message: what went wrong, naming the file or tensor.
        path: the file concerned, when there is one (prefixed to the message).
        hint: what the user can do about it (appended to the message).
    """

    exit_code: int = 2

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.hint = hint
        self.bare_message = message
        text = f"{self.path}: {message}" if self.path is not None else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)

    @property
    def message(self) -> str:
        return str(self)


class UsageError(LlmconvError):
    """Flags that do not fit together, or a request the tool cannot interpret."""


class InputError(LlmconvError):
    """An input that cannot be used: missing, unreadable, or of an unknown kind."""


class CorruptInput(InputError):
    """An input whose bytes contradict its own format (truncated, bad header, lying offsets)."""


class UnsafeInput(InputError):
    """An input that would run code or reach outside its folder if it were used."""


class Unsupported(LlmconvError):
    """A valid input or request that llmconv does not handle (yet)."""


class GraphRunError(Unsupported):
    """onnxruntime loaded an ONNX graph but failed while running it on a feed.

    Attributes:
        op: the op type of the node that failed (``Split``), when onnxruntime names it.
        node: that node's name, when onnxruntime names it.
        detail: onnxruntime's own message (its status message when it names a node).
        shape: the shape of the feed's main input (``input_ids``, ``pixel_values``), when known.
    """

    def __init__(self, *, op: str | None, node: str | None, detail: str, shape: list[int] | None = None,
                 path: str | Path | None = None) -> None:
        self.op, self.node, self.detail = op, node, detail
        self.shape = list(shape) if shape is not None else None
        where = f"{op or 'a'} node {node}: " if node else (f"{op} node: " if op else "")
        inputs = f" (inputs {self.shape})" if self.shape is not None else ""
        super().__init__(f"onnxruntime cannot run the graph: {where}{detail}{inputs}", path=path)


class MissingDependency(LlmconvError):
    """An optional backend is not installed; the message gives the pip command."""


class DestinationError(LlmconvError):
    """The destination exists (without --force), equals the source, or lies inside it."""


class ConversionError(LlmconvError):
    """A conversion that cannot be done faithfully (an fp16 overflow, say)."""


class NotEquivalent(LlmconvError):
    """Verification found the two models not equivalent. Carries the report.

    Attributes:
        report: the verification report that failed (a VerifyReport).
        result: the command's own report as far as it got (a ConvertReport, QuantizeReport or PruneReport,
            with None for what is not known), with ``report`` inside it; None where there is none.
        kept: where the output that failed verification was kept (``llmconv.io.keep_failed``); None when it
            was removed.
    """

    exit_code = 1
    kept: Path | None = None

    def __init__(self, message: str, *, report: Any = None, path: str | Path | None = None,
                 result: Any = None) -> None:
        self.report = report
        self.result = result
        super().__init__(message, path=path)

    def amend(self, text: str) -> None:
        """Append ``; text`` to the message (to say what became of the failed output)."""
        self.bare_message = f"{self.bare_message}; {text}"
        self.args = (f"{self}; {text}",)
