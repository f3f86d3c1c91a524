"""llmconv: move LLM checkpoints between formats and prove the result is still the same model.

The public Python API. Importing this package is cheap: torch and friends load on first use.

Example:
    >>> import llmconv
    >>> report = llmconv.convert("gpt2/pytorch_model.bin", "gpt2.safetensors")
    >>> llmconv.verify("gpt2/pytorch_model.bin", "gpt2.safetensors").passed
    True
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["convert", "inspect", "verify", "quantize", "prune", "merge", "__version__"]

_API = {
    "convert": ("llmconv.conversion", "convert"),
    "inspect": ("llmconv.inspection", "inspect"),
    "verify": ("llmconv.verification.api", "verify"),
    "quantize": ("llmconv.transforms.quantize", "quantize"),
    "prune": ("llmconv.transforms.prune", "prune"),
    "merge": ("llmconv.merge", "merge"),
}


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'llmconv' has no attribute {name!r}")
