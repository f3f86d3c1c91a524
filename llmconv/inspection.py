"""What a checkpoint holds: format, tensors, parameters, dtypes, bytes, shards, metadata, ties."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from llmconv.checkpoint import dtype_name, ties_on_load
from llmconv.formats import registry

INSPECT_SCHEMA = "llmconv.inspect/1"


def inspect(path: str | Path, *, sparsity: bool = False) -> dict[str, Any]:
    """Describe the checkpoint at ``path`` without loading its tensors (headers only).

    Args:
        path: a checkpoint file or folder.
        sparsity: also count zeros in floating-point weight matrices (reads every such tensor).
    Returns:
        A JSON-ready dict (schema ``llmconv.inspect/1``).
    Example:
        >>> inspect("model.safetensors")["parameters"]
    """
    t0 = time.perf_counter()
    path = Path(path)
    fmt = registry.detect(path)
    with fmt.open(path) as src:
        hist: Counter[str] = Counter()
        bytes_by_dtype: Counter[str] = Counter()
        for n, info in src.infos.items():
            if n in src.aliases:
                continue
            hist[dtype_name(info.dtype)] += 1
            bytes_by_dtype[dtype_name(info.dtype)] += info.nbytes
        size_on_disk = sum(f.stat().st_size for f in src.files if f.exists())
        out: dict[str, Any] = {
            "schema": INSPECT_SCHEMA, "ok": True, "path": str(path), "format": fmt.name,
            "weights_format": src.weights_format, "tensors": len(src.infos) - len(src.aliases),
            "parameters": src.num_parameters, "bytes": src.total_bytes, "size_on_disk": size_on_disk,
            "dtypes": dict(sorted(hist.items())), "bytes_by_dtype": dict(sorted(bytes_by_dtype.items())),
            "files": sorted(str(f.relative_to(path)) if path.is_dir() else f.name for f in src.files),
            "shards": src.details.get("shards", 1), "metadata": dict(src.metadata),
            "tied": dict(sorted(src.aliases.items())),
            # Present for every format (None without a config.json, or without --sparsity); the format's own
            # details (ONNX opset, ops, inputs, ...; a sharded index) follow.
            "architecture": None, "model_type": None, "extra_files": None, "tie_word_embeddings": None,
            "tied_by_config": None, "largest": None, "sparsity": None, "seconds": None,
        }
        if src.format == "peft":  # an adapter folder's own files (adapter_config.json, README, tokenizer)
            out["extra_files"] = [str(f.relative_to(path)) for f in src.extra_files]
        if src.config is not None:
            out["architecture"] = (src.config.get("architectures") or [None])[0]
            out["model_type"] = src.config.get("model_type")
            # A folder's own files relative to it; files a one-file format builds beside it (GGUF's config.json
            # and tokenizer, in a scratch folder) by name.
            out["extra_files"] = [str(f.relative_to(path)) if f.is_relative_to(path) else f.name
                                  for f in src.extra_files]
            if "tie_word_embeddings" in src.config:
                out["tie_word_embeddings"] = bool(src.config["tie_word_embeddings"])
            out["tied_by_config"] = _config_ties(out["architecture"], src.config, set(src.infos))
        for key, value in src.details.items():
            # A GGUF's per-tensor table and an adapter's config: the format's describe() summarises them.
            if key not in ("shards", "gguf", "adapter_config"):
                out.setdefault(key, value)
        out.update(fmt.describe(path))  # what the file says of itself (a GGUF's metadata, its type counts)
        largest = sorted(src.infos.values(), key=lambda i: i.nbytes, reverse=True)[:5]
        out["largest"] = [{"name": i.name, "dtype": dtype_name(i.dtype), "shape": list(i.shape), "bytes": i.nbytes}
                          for i in largest]
        if sparsity:
            out["sparsity"] = _sparsity(src)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _config_ties(architecture: str | None, config: dict[str, Any], stored: set[str]) -> list[str]:
    """Weights the model ties to its input embedding that the folder does not store.

    transformers saves a tied output head once, as the embedding, and ties it again on load, so a
    folder's files never show the tie. Whether it ties is the rule conversion and verification use
    (:func:`llmconv.checkpoint.ties_on_load`); which names, the model class's ``_tied_weights_keys``.
    Empty when transformers is not installed or does not know the architecture.
    """
    if not architecture or not ties_on_load(config):
        return []
    try:
        import transformers
    except ImportError:
        return []
    keys = getattr(getattr(transformers, architecture, None), "_tied_weights_keys", None) or []
    return sorted(k for k in keys if not any(n == k or n.endswith("." + k) for n in stored))


def _sparsity(src) -> dict[str, Any]:
    per: dict[str, float] = {}
    zeros = total = 0
    for n, info in src.infos.items():
        if n in src.aliases or len(info.shape) < 2 or not info.dtype.is_floating_point:
            continue
        t = src.tensor(n)
        z = int((t == 0).sum())
        per[n] = round(z / max(1, t.numel()), 6)
        zeros += z
        total += t.numel()
    return {"overall": round(zeros / total, 6) if total else 0.0, "per_tensor": per}
