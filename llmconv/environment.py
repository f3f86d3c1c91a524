"""What this machine offers llmconv: versions, the CPU's int8 class and rule, onnxruntime's providers."""

from __future__ import annotations

import platform
import sys
from typing import Any

ENV_SCHEMA = "llmconv.env/1"
PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-gpu",
            "onnxruntime-genai", "safetensors", "numpy", "gguf", "peft")


def environment() -> dict[str, Any]:
    """Versions of llmconv, Python and the packages it uses (None where not installed), this CPU's features
    and the int8 settings ``quantize --target cpu`` picks for it, and the execution providers onnxruntime has.

    Example:
        >>> environment()["cpu"]["isa"] in ("avx512-vnni", "avx-vnni", "avx512", "avx2", "x86-64", "arm64", "unknown")
        True
    """
    from importlib import metadata

    from llmconv import __version__
    from llmconv.transforms.cpu import detect_cpu, int8_rule

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cpu = detect_cpu()
    rule = int8_rule(cpu.isa)
    providers: list[str] = []
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except ImportError:
        pass
    return {
        "schema": ENV_SCHEMA, "ok": True, "llmconv": __version__, "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}", "executable": sys.executable,
        "packages": versions, "cpu": cpu.to_json(),
        "int8_rule": {"for": cpu.isa, "weights": "7-bit signed (reduce_range), per-channel" if rule.reduce_range
                      else "full-range signed int8", **rule.to_json()},
        "execution_providers": providers,
    }
