"""``verify``: compare a candidate model with a reference, in weights or outputs mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmconv.errors import UsageError
from llmconv.formats import registry
from llmconv.verification.report import VerifyReport
from llmconv.verification.weights import compare_weights

_NAMED_WEIGHTS = ("safetensors", "pytorch", "hf")


def choose_mode(ref_format: str, cand_format: str, *, mode: str, wants_outputs: bool) -> str:
    """``auto``: weights when both sides hold named weights, outputs when either is ONNX or inputs are given."""
    if mode != "auto":
        return mode
    if wants_outputs or "onnx" in (ref_format, cand_format):
        return "outputs"
    if ref_format in _NAMED_WEIGHTS and cand_format in _NAMED_WEIGHTS:
        return "weights"
    return "outputs"


def verify(reference: str | Path, candidate: str | Path, *, mode: str = "auto", profile: str = "auto",
           atol: float | None = None, rtol: float | None = None, progress=None, **outputs_options: Any) -> VerifyReport:
    """Compare ``candidate`` with ``reference``.

    Args:
        reference: the model taken as right (file or folder).
        candidate: the model checked.
        mode: ``auto``, ``weights`` or ``outputs``.
        profile: tolerance profile (``auto``, ``exact``, ``fp32``, ``fp16``, ``bf16``, ``int8``, ``int4``).
        atol: absolute tolerance override.
        rtol: relative tolerance override.
        progress: called with bytes compared (weights mode).
        outputs_options: inputs, batch, seq_len, samples, seed, provider, text (outputs mode).
    Returns:
        A VerifyReport; ``report.passed`` is the verdict.
    Example:
        >>> verify("model.bin", "model.safetensors").passed
    """
    ref_path, cand_path = Path(reference), Path(candidate)
    ref_fmt, cand_fmt = registry.detect(ref_path), registry.detect(cand_path)
    wants_outputs = bool(outputs_options.get("inputs") or outputs_options.get("text"))
    chosen = choose_mode(ref_fmt.name, cand_fmt.name, mode=mode, wants_outputs=wants_outputs)
    if chosen == "weights":
        from llmconv.verification.profiles import weights_tolerance

        for label, value in (("--atol", atol), ("--rtol", rtol)):
            if value is not None and not value >= 0:
                raise UsageError(f"{label} must be >= 0, not {value}")
        name, p_atol, p_rtol = weights_tolerance(profile)
        if name == "exact" and (atol is not None or rtol is not None):
            name = "custom"  # bit-exact no longer: the report must not say "exact"
        atol = p_atol if atol is None else atol
        rtol = p_rtol if rtol is None and atol is not None else rtol
        with ref_fmt.open(ref_path) as ref, cand_fmt.open(cand_path) as cand:
            report = compare_weights(ref, cand, atol=atol, rtol=rtol, profile=name, progress=progress)
        if atol is not None or rtol is not None:
            report.extra["thresholds"] = {"atol": atol or 0.0, "rtol": rtol or 0.0}
        return report
    if chosen == "outputs":
        from llmconv.verification.outputs import LOCALIZE_HINT, compare_outputs

        report = compare_outputs(ref_path, cand_path, profile=profile, atol=atol, rtol=rtol, **outputs_options)
        # --localize searches single graphs and PyTorch; not encoder-decoders (their report lists "graphs"), nor a
        # candidate that does not run at all.
        searchable = "graphs" not in report.extra and not any(c.name == "runs" for c in report.checks)
        if not report.passed and not outputs_options.get("localize") and searchable:
            report.notes.append(LOCALIZE_HINT)
        return report
    raise UsageError(f"unknown --mode {mode!r}", hint="use auto, weights or outputs")
