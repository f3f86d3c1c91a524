"""A GGUF output (``convert HF X.gguf``, ``quantize HF X.gguf --method q8_0``), verified before it is renamed.

Two checks, both before the rename: the file read back through llmconv's reader, tensor by tensor (float tensors bit
for bit after the dtype the file stores, block-quantized ones against their block grid); and, for an hf source, the
model run through transformers' own GGUF loader (independent of llmconv's reader: its names, layout and
dequantization) against the source model, decode and generation checks included.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmconv import progress as status
from llmconv.checkpoint import CAST_TARGETS, cast_source
from llmconv.errors import NotEquivalent, UsageError
from llmconv.formats import registry
from llmconv.formats.registry import WriteOptions
from llmconv.io import atomic_output, check_free_space
from llmconv.verification.report import VerifyReport
from llmconv.verification.weights import compare_weights, require_tensors

# The outputs profile a GGUF of each method is judged by.
PROFILES = {None: None, "q8_0": "int8", "q4_0": "int4", "q4_1": "int4", "q5_0": "int4", "q5_1": "int4"}


@dataclass
class GgufResult:
    """What writing a GGUF file did."""

    files: list[str]
    bytes_written: int
    source_bytes: int
    tensors: int
    parameters: int
    cast: list[str]
    weights: VerifyReport | None
    outputs: VerifyReport | None
    notes: list[str] = field(default_factory=list)
    types: dict[str, int] = field(default_factory=dict)

    @property
    def verification(self) -> VerifyReport | None:
        """The report that decides: outputs when they ran, else weights."""
        return self.outputs if self.outputs is not None else self.weights


def write_gguf_verified(src_path: Path, dst_path: Path, *, method: str | None, dtype: str = "keep",
                        verify: bool = True, force: bool = False, progress: Any = None,
                        outputs_options: dict[str, Any] | None = None, failed: Any = None) -> GgufResult:
    """Write ``src_path`` (an hf folder) as GGUF at ``dst_path``; verify it before the rename.

    Args:
        src_path: the checkpoint (an hf folder: GGUF needs its config and tokenizer).
        dst_path: the ``.gguf`` file to write.
        method: None keeps float dtypes (after ``dtype``); q8_0/q4_0/q4_1/q5_0/q5_1 quantize.
        dtype: ``keep``, ``fp32``, ``fp16`` or ``bf16`` (float outputs).
        verify: compare the file with the source before renaming it into place.
        force: replace an existing destination.
        progress: called with bytes written.
        outputs_options: for the outputs check (text, decode_steps, generate, atol, rtol, max_ppl_increase).
        failed: called with the partial GgufResult to build the caller's report when verification fails.
    Raises:
        NotEquivalent: the file is not the source's model; nothing is left at ``dst_path``.
    """
    from llmconv.formats.gguf import FORMAT as GGUF
    from llmconv.formats.gguf import open_gguf, plan

    src_fmt = registry.detect(src_path)
    if dtype != "keep" and dtype not in CAST_TARGETS:
        raise UsageError(f"unknown --dtype {dtype!r}", hint="use keep, fp32, fp16 or bf16")
    with status.phase(f"reading {src_path.name}"):
        opened = src_fmt.open(src_path)
    with opened as source:
        require_tensors(source, what="convert")
        view, cast = (source, []) if dtype == "keep" else cast_source(source, CAST_TARGETS[dtype])
        _, _, entries, _ = plan(view, method)  # refuses an architecture or tensor GGUF cannot hold, before writing
        check_free_space(dst_path, sum(e.nbytes for e in entries))
        notes: list[str] = []
        with atomic_output(dst_path, folder=False, force=force) as tmp:
            label = method.upper() if method else ("float" if dtype == "keep" else dtype)
            with status.phase(f"writing {dst_path.name} ({label})"):
                GGUF.write(view, tmp, folder=False, options=WriteOptions(progress=progress, quantize=method,
                                                                         notes=notes))
            result = GgufResult(files=[str(dst_path)], bytes_written=tmp.stat().st_size,
                                source_bytes=source.total_bytes, tensors=len(entries), parameters=view.num_parameters,
                                cast=cast, weights=None, outputs=None, notes=notes,
                                types=dict(Counter(e.gtype.name for e in entries)))
            if verify:
                with status.phase(f"verifying {dst_path.name}: its tensors against the source"), \
                        open_gguf(tmp, folder_files=False) as written:
                    result.weights = compare_weights(view, written, profile="exact" if method is None else
                                                     PROFILES[method])
                    result.weights.reference, result.weights.candidate = str(src_path), str(dst_path)
                if not result.weights.passed:
                    raise NotEquivalent(f"the GGUF file's tensors differ from the source: {result.weights.summary()}; "
                                        "nothing was written", report=result.weights, path=dst_path,
                                        result=failed(result) if failed else None)
                if src_fmt.name == "hf":
                    result.outputs = _outputs(src_path, tmp, dst_path, method=method, dtype=dtype,
                                              options=outputs_options or {})
                    if not result.outputs.passed:
                        raise NotEquivalent(f"the GGUF model's outputs (transformers' GGUF loader) are not within the "
                                            f"{result.outputs.profile} profile of the source: "
                                            f"{result.outputs.summary()}; nothing was written",
                                            report=result.outputs, path=dst_path,
                                            result=failed(result) if failed else None)
    return result


def _outputs(src_path: Path, tmp: Path, dst_path: Path, *, method: str | None, dtype: str,
             options: dict[str, Any]) -> VerifyReport:
    from llmconv.verification.outputs import compare_outputs

    profile = PROFILES[method] or {"keep": "auto", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}[dtype]
    with status.phase(f"verifying {dst_path.name}: the model through transformers' GGUF loader against the source"):
        report = compare_outputs(src_path, tmp, profile=profile, **options)
    report.reference, report.candidate = str(src_path), str(dst_path)
    return report


def weights_note(weights: VerifyReport) -> str:
    """One line for the tensor-by-tensor check when the outputs check is the report shown."""
    n = len(weights.checks)
    exact = sum(1 for c in weights.checks if c.figures.get("equal"))
    grid = [c for c in weights.checks if "gguf_type" in c.figures]
    parts = [f"{exact} bit-exact" if exact else ""]
    if grid:
        worst = max(float(c.figures.get("max_steps") or 0.0) for c in grid)
        parts.append(f"{len(grid)} on their block grid (worst {worst:.2f} steps)")
    others = n - exact - len(grid)
    if others:
        parts.append(f"{others} equal after the cast to the stored dtype")
    return (f"tensors read back through llmconv's reader: {n} compared, " + ", ".join(p for p in parts if p)
            + " (weights check passed)")
