"""llmconv prune (being built)"""

from __future__ import annotations

HELP = "prune (being built)."
EPILOG = ""


def command() -> None:
    from llmconv.errors import Unsupported

    raise Unsupported("prune is being built")
