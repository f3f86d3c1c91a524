"""What llmconv can do, as data (``llmconv formats``)."""

from __future__ import annotations

from typing import Any

from llmconv.formats import registry


def matrix() -> dict[str, Any]:
    """The supported conversions and transforms."""
    fmts = registry.all_formats()
    names = [f.name for f in fmts]
    weights = [f.name for f in fmts if f.writable]
    conversions: dict[str, list[str]] = {}
    for f in fmts:
        dests = list(weights)
        if f.name == "hf":
            dests.append("onnx")
        conversions[f.name] = dests
    return {
        "schema": "llmconv.formats/1",
        "ok": True,
        "formats": names,
        "format_details": [{"name": f.name, "description": f.description, "extensions": list(f.extensions),
                            "writable": f.writable or f.name == "onnx"} for f in fmts],
        "conversions": conversions,
        "transforms": {
            "quantize": "int8-dynamic, int8-static, int4 (ONNX; hf folders are exported first); "
                        "fp16 (ONNX and weights), bf16 (weights)",
            "prune": "unstructured, 2:4, rows (safetensors, pytorch, hf, ONNX initializers)",
            "cast": "--dtype fp32|fp16|bf16 on any weights conversion, with an fp16 overflow check",
        },
    }
