"""llmconv quantize (being built)"""

from __future__ import annotations

HELP = "quantize (being built)."
EPILOG = ""


def command() -> None:
    from llmconv.errors import Unsupported

    raise Unsupported("quantize is being built")
