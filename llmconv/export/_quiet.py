"""Keep exporters' chatter (tracer warnings, deprecation notes, info logs) off the user's terminal.

Our own report says what happened; with ``LLMCONV_DEBUG=1`` everything is shown as it comes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

_LOGGERS = ("transformers", "optimum", "torch.onnx", "torch._dynamo", "onnxscript")


def _debug() -> bool:
    return os.environ.get("LLMCONV_DEBUG", "") not in ("", "0", "false", "no")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence warnings and the loggers of transformers, optimum and torch.onnx for the block."""
    if _debug():
        yield
        return
    saved: list[tuple[logging.Logger, int]] = []
    for name in _LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.level))
        lg.setLevel(logging.ERROR)
    tf_verbosity = None
    try:
        from transformers.utils import logging as tf_logging

        tf_verbosity = tf_logging.get_verbosity()
        tf_logging.set_verbosity_error()
        bars = tf_logging.is_progress_bar_enabled()
        tf_logging.disable_progress_bar()  # "Loading checkpoint shards" of a sharded folder, on stderr
    except ImportError:
        tf_logging = None
    try:
        with warnings.catch_warnings(), _no_cpp_stdout():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)
        if tf_logging is not None and tf_verbosity is not None:
            tf_logging.set_verbosity(tf_verbosity)
            if bars:
                tf_logging.enable_progress_bar()


@contextlib.contextmanager
def _no_cpp_stdout() -> Iterator[None]:
    """Send what C++ code writes to the process's stdout to /dev/null for the block.

    torch's TorchScript exporter turns its ONNX log on for every export and never off again (its
    ``setup_onnx_logging`` tests a function object for truth), so a failed export dumps the whole
    IR graph onto stdout: hundreds of lines in front of ``--json``'s one object.
    """
    import sys

    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured in tests): nothing to guard
        fd = 1
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        with fd_redirected(fd, sink):
            try:
                yield
            finally:
                _onnx_log_off()
    finally:
        os.close(sink)


@contextlib.contextmanager
def fd_redirected(fd: int, to: int) -> Iterator[None]:
    """Point file descriptor ``fd`` at ``to`` for the block: what C++ code writes to ``fd`` goes there."""
    saved = os.dup(fd)
    os.dup2(to, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _onnx_log_off() -> None:
    torch = __import__("sys").modules.get("torch")
    if torch is not None and hasattr(torch._C, "_jit_set_onnx_log_enabled"):
        torch._C._jit_set_onnx_log_enabled(False)
