"""Session-built ONNX models for the quantize and prune tests (plain functions: every test module
that needs one wraps it in a session fixture; the files are built once, under the session's fixtures folder)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# LLMCONV_TRAINED_FIXTURE points the quality tests at another build of the trained model.
TRAINED = Path(os.environ.get("LLMCONV_TRAINED_FIXTURE") or ROOT / "fixtures" / "models" / "trained-gpt2")
HELDOUT = ROOT / "fixtures" / "data" / "heldout.txt"


def exported(fixtures_dir: Path, fx: Callable[[str], Path], name: str) -> Path:
    """The hf fixture ``name`` exported to an ONNX folder (model.onnx, config, tokenizer)."""
    out = fixtures_dir / "onnx-transforms" / name
    if not out.exists():
        from llmconv.export import to_onnx

        src = TRAINED if name == "trained-gpt2" else fx(name)
        to_onnx(src, out, src_format="hf", dtype="keep", verify=False, force=False)
    return out


def external_data(fixtures_dir: Path, fx: Callable[[str], Path], name: str) -> Path:
    """``exported(name)`` saved again with every weight in one external data file ``model.onnx.data``."""
    out = fixtures_dir / "onnx-transforms-external" / name
    if not out.exists():
        import shutil

        import onnx

        src = exported(fixtures_dir, fx, name)
        out.mkdir(parents=True)
        for p in src.iterdir():
            if p.suffix != ".onnx":
                shutil.copy(p, out / p.name)
        model = onnx.load(str(src / "model.onnx"))
        onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=0)
    return out


def leftovers(folder: Path) -> list[str]:
    """Temporary names our atomic writes use; a failed run must leave none."""
    return sorted(p.name for p in folder.rglob("*") if ".llmconv-" in p.name)
