"""ONNX exports of the tiny fixture models, made once per session and shared by the export, verify and
CLI tests (plain functions; each test folder wraps them in session fixtures).

Every export goes through ``llmconv.export.to_onnx`` in-process (no subprocess: imports cost ~5 s
each time) with verification on, so building them is itself the test that export + verify pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Small thread pools: the suite runs on 2 cores, often beside other work.
os.environ.setdefault("LLMCONV_ORT_THREADS", "1")

DECODERS = ("gpt2", "llama", "mistral", "qwen2", "phi3")
ARCHITECTURES = (*DECODERS, "bert")
VISION = ("vit", "resnet")  # image-classification and feature-extraction from pixel_values
_REPORTS: dict[Path, Any] = {}


def export(fixtures_dir: Path, fx: Callable[[str], Path], name: str, task: str | None = None,
           *, verify: bool = True) -> tuple[Path, Any]:
    """The hf fixture ``name`` exported to an ONNX folder for ``task`` (None: auto); (folder, ConvertReport)."""
    out = fixtures_dir / "onnx-export" / f"{name}--{task or 'auto'}{'' if verify else '--unverified'}"
    if out not in _REPORTS:
        from llmconv.export import to_onnx

        _REPORTS[out] = to_onnx(fx(name), out, src_format="hf", dtype="keep", verify=verify, force=True, task=task)
    return out, _REPORTS[out]


def edit_initializers(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Copy the ONNX folder ``src`` to ``dst`` with ``edit(name -> numpy array)`` applied to its initializers."""
    import shutil

    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    edit(arrays)
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    onnx.save(model, str(dst / "model.onnx"))
    return dst


def by_shape(arrays: dict[str, Any], shape: tuple[int, ...]) -> str:
    """The name of the first initializer of ``shape`` (exported MatMul weights have generated names)."""
    return next(n for n, a in arrays.items() if tuple(a.shape) == shape)
