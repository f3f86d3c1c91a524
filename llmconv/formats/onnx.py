"""ONNX models (being built)."""

from __future__ import annotations

from pathlib import Path

from llmconv.formats.registry import Format, register


class OnnxFormat(Format):
    name = "onnx"
    description = "ONNX model (.onnx), with external data files beside it"
    extensions = (".onnx",)
    writable = False

    def sniff(self, path: Path, head: bytes) -> bool:
        return False


FORMAT = register(OnnxFormat())
