"""``verify``: compare a candidate model with a reference, in weights or outputs mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmconv import progress as status
from llmconv.errors import UsageError
from llmconv.formats import registry
from llmconv.io import check_keep_folder, input_files, keep_failed_dir, keep_report
from llmconv.verification.report import VerifyReport
from llmconv.verification.weights import compare_weights

_NAMED_WEIGHTS = ("safetensors", "pytorch", "hf", "peft")


def choose_mode(ref_format: str, cand_format: str, *, mode: str, wants_outputs: bool) -> str:
    """``auto``: weights when both sides hold named weights, outputs when either is ONNX or inputs are given."""
    if mode != "auto":
        return mode
    if wants_outputs or "onnx" in (ref_format, cand_format):
        return "outputs"
    if ref_format in _NAMED_WEIGHTS and cand_format in _NAMED_WEIGHTS:
        return "weights"
    if "gguf" in (ref_format, cand_format) and {ref_format, cand_format} & {"safetensors", "pytorch"}:
        return "weights"  # a bare weights file cannot run: GGUF against it tensor by tensor
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
    if keep_failed_dir() is not None:  # the folder a failing report is kept in: checked before any work
        reads = [ref_path, cand_path, *(Path(p) for k in ("inputs", "text", "prompts")
                                        if (p := outputs_options.get(k)) is not None)]
        check_keep_folder(sources=[ref_path, cand_path], dst=None, inputs=[f for p in reads for f in input_files(p)],
                          name=cand_path.name, owner=cand_path)
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
        with status.phase("comparing weights"), ref_fmt.open(ref_path) as ref, cand_fmt.open(cand_path) as cand:
            (ref, ref_notes), (cand, cand_notes) = _as_checkpoint(ref), _as_checkpoint(cand)
            report = compare_weights(ref, cand, atol=atol, rtol=rtol, profile=name, progress=progress)
        report.notes += ref_notes + cand_notes
        if atol is not None or rtol is not None:
            report.extra["thresholds"] = {"atol": atol or 0.0, "rtol": rtol or 0.0}
        return keep_report(report, cand_path)
    if chosen == "outputs":
        from llmconv.verification.outputs import LOCALIZE_HINT, compare_outputs
        from llmconv.verification.seq2seq import applies as is_encoder_decoder

        report = compare_outputs(ref_path, cand_path, profile=profile, atol=atol, rtol=rtol, **outputs_options)
        # Encoder-decoders (several graphs, the question compare_outputs asked too) are neither searched by
        # --localize nor compared through a name record; nor is a candidate that does not run at all searched.
        several_graphs = is_encoder_decoder(ref_path, cand_path)
        searchable = not several_graphs and not any(c.name == "runs" for c in report.checks)
        if not report.passed and not outputs_options.get("localize") and searchable:
            report.notes.append(LOCALIZE_HINT)
        if not several_graphs:
            _add_graph_weights(report, ref_path, cand_path, ref_fmt.name, cand_fmt.name)
        return keep_report(report, cand_path)
    raise UsageError(f"unknown --mode {mode!r}", hint="use auto, weights or outputs")


def _as_checkpoint(src: Any) -> tuple[Any, list[str]]:
    """A graph llmconv exported, under its checkpoint's names (its name record), as ``convert`` writes its weights;
    anything else as it is."""
    if src.format != "onnx":
        return src, []
    from llmconv.formats.onnx import restore_names

    view, notes = restore_names(src, for_hf=False)
    return view, (notes if view is not src else [])


def _add_graph_weights(report: VerifyReport, ref_path: Path, cand_path: Path, ref_fmt: str, cand_fmt: str) -> None:
    """Named weights on one side, a graph llmconv exported on the other: add the check ``weights``, the graph's
    weights compared with the checkpoint's tensor by tensor through its name record (outputs on random ids never
    read most rows of an embedding). A graph without a usable record gets a note saying what was not compared."""
    pairs = {(ref_fmt, cand_fmt): (ref_path, cand_path), (cand_fmt, ref_fmt): (cand_path, ref_path)}
    found = next(((w, g) for (wf, gf), (w, g) in pairs.items() if wf in _NAMED_WEIGHTS and gf == "onnx"), None)
    if found is None:
        return
    weights_path, graph_path = found
    from llmconv.formats.onnx import open_model, read_name_record
    from llmconv.verification.profiles import WEIGHTS_TOLERANCES
    from llmconv.verification.weights import compare_graph_weights

    record = read_name_record(graph_path)
    if record is None or record.unavailable is not None:
        why = "it carries no name record" if record is None else record.unavailable
        report.notes.append(f"the graph's weights were not compared with the checkpoint's tensor by tensor: {why}")
        return
    if report.profile not in WEIGHTS_TOLERANCES or report.profile in ("int8", "int4"):
        report.notes.append(f"the graph's weights were not compared tensor by tensor: profile {report.profile} "
                            "judges outputs only")
        return
    # An export copies the checkpoint's values: bit-exact, unless a lossy profile was asked for.
    atol, rtol = (None, None) if report.profile in ("exact", "fp32") else WEIGHTS_TOLERANCES[report.profile]
    with registry.detect(weights_path).open(weights_path) as checkpoint, open_model(graph_path) as graph:
        report.checks.append(compare_graph_weights(checkpoint, graph, atol=atol, rtol=rtol))
