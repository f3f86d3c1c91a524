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
    except ImportError:
        tf_logging = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)
        if tf_logging is not None and tf_verbosity is not None:
            tf_logging.set_verbosity(tf_verbosity)
