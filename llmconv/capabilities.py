"""What llmconv can do, as data (``llmconv formats``)."""

from __future__ import annotations

from typing import Any

from llmconv.formats import registry

# An ONNX graph's initializers mostly have exporter names (onnx::MatMul_123); only the name record llmconv's
# export writes into the graph (llmconv.formats.onnx) gives them their checkpoint names back.
CONDITIONS: dict[str, dict[str, str]] = {
    "hf": {
        "gguf": "Llama, Mistral, Qwen2, Qwen3 and GPT-2 with a byte-level BPE tokenizer.json (GPT-2, Llama 3, Qwen2 "
                "pre-tokenizers); float dtypes kept or cast (--dtype), or quantize --method q8_0|q4_0|q4_1|q5_0|q5_1",
    },
    "gguf": {
        "hf": "GGUF of llama, qwen2, qwen3 or gpt2 with F32/F16/BF16/Q8_0/Q4_x/Q5_x tensors: checkpoint names, Q/K "
              "permutation undone, config.json and tokenizer built by transformers from the metadata",
        "gguf": "its tensors are read back as the checkpoint's (same architectures as -> hf), then written again",
    },
    "peft": {
        "peft": "adapter_config.json carried, weights as adapter_model.safetensors or adapter_model.bin (--to), "
                "names kept: PEFT loads the folder",
        "safetensors": "a folder destination stays an adapter folder PEFT loads; a .safetensors file holds the "
                       "weights only (adapter_config.json is not carried)",
        "pytorch": "a folder destination stays an adapter folder PEFT loads; a .bin file holds the weights only",
    },
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
        # GGUF is written from a model folder (its config names the architecture, its tokenizer the vocabulary).
        dests = [d for d in weights if (d != "gguf" or f.name in ("hf", "gguf")) and d != "peft"]
        if f.name == "peft":  # an adapter stays an adapter folder (or becomes a bare weights file)
            dests = ["peft", "safetensors", "pytorch"]
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
                        "fp16 (ONNX and weights), bf16 (weights); q8_0, q4_0, q4_1, q5_0, q5_1 (GGUF, from hf)",
            "prune": "unstructured, 2:4, rows (safetensors, pytorch, hf, ONNX initializers)",
            "cast": "--dtype fp32|fp16|bf16 on any weights conversion, with an fp16 overflow check",
            "merge": "LoRA adapters (PEFT folders; rsLoRA, rank/alpha patterns, modules_to_save, several with "
                     "--weights) into their hf base, verified against PEFT's unmerged model (llmconv merge)",
        },
    }
