"""What llmconv can do, as data (``llmconv formats``)."""

from __future__ import annotations

from typing import Any

from llmconv.formats import registry

# An ONNX graph's initializers mostly have exporter names (onnx::MatMul_123); only the name record llmconv's
# export writes into the graph (llmconv.formats.onnx) gives them their checkpoint names back.
CONDITIONS: dict[str, dict[str, str]] = {
    "onnx": {
        "hf": "only a graph llmconv exported (one graph, not quantized since), which carries the name record: "
              "checkpoint names, transposes undone, config.json from the record, loads with from_pretrained; "
              "any other graph exits 2 saying why",
        "safetensors": "checkpoint names when the graph carries llmconv's name record, else the ONNX initializer "
                       "names (onnx::MatMul_123)",
        "pytorch": "checkpoint names when the graph carries llmconv's name record, else the ONNX initializer "
                   "names (onnx::MatMul_123)",
    },
}


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
        # What holds only under a condition, per source and destination (the table marks those cells).
        "conversion_conditions": CONDITIONS,
        "transforms": {
            "quantize": "int8-dynamic, int8-static, int4 (ONNX; hf folders are exported first); "
                        "fp16 (ONNX and weights), bf16 (weights)",
            "prune": "unstructured, 2:4, rows (safetensors, pytorch, hf, ONNX initializers)",
            "cast": "--dtype fp32|fp16|bf16 on any weights conversion, with an fp16 overflow check",
        },
    }
