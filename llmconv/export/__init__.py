"""Graphs: Hugging Face folder -> ONNX, through optimum-onnx (torch.onnx for what optimum does not know).

The export runs in a scratch folder beside the destination, is finished there (one external data
file when needed, an IR version onnxruntime loads), verified in outputs mode against the PyTorch
model, and only then renamed into place. Encoder-decoders (T5, BART) become optimum's two-graph folder.
Weights back out of ONNX (``.onnx`` -> ``.safetensors``) need no code here: ``llmconv.formats.onnx`` opens
initializers as named tensors.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from llmconv import progress
from llmconv.errors import DestinationError, InputError, NotEquivalent, Unsupported, UsageError
from llmconv.io import atomic_output, check_replaceable, keep_candidate

if TYPE_CHECKING:
    from llmconv.conversion import ConvertReport
    from llmconv.export.exporters import ExportPlan
    from llmconv.formats.registry import Format
    from llmconv.verification.report import VerifyReport

__all__ = ["to_onnx"]


def to_onnx(src_path: str | Path, dst_path: str | Path, *, src_format: Format | str, dtype: str, verify: bool,
            force: bool, task: str | None = None, opset: int | None = None, config: str | Path | None = None,
            external_data: bool = False, provider: str = "cpu", decode_steps: int | None = None,
            generate: int | None = None) -> ConvertReport:
    """Export a Hugging Face model to ONNX, verify it against PyTorch, then put it in place.

    Args:
        src_path: an hf folder, or a bare weights file (safetensors/PyTorch) with ``config``.
        dst_path: a ``.onnx`` file (its external data, if any, beside it as ``<name>_data``), or a
            folder that receives ``model.onnx`` with config, generation config and tokenizer files (for an
            encoder-decoder, a folder only: ``encoder_model.onnx`` and ``decoder_model_merged.onnx``).
        src_format: the source's format (a registry Format or its name).
        dtype: ``keep`` or ``fp32``: graphs are exported in float32 (see ``llmconv quantize`` for fp16).
        verify: compare the graph's outputs with PyTorch's before renaming it into place.
        force: replace an existing destination.
        task: as optimum names tasks (``text-generation-with-past``, ``feature-extraction``, ...);
            None infers it from config.json, with past key/values for decoders.
        opset: ONNX opset; None for the exporter's default for the architecture.
        config: a config.json for a bare weights file.
        external_data: store the weights in an external data file even below the 2 GB limit.
        provider: onnxruntime execution provider for the verification (``cpu`` or ``cuda``).
    Returns:
        A ConvertReport; ``extra`` holds task, opset, ir_version, exporter and external_data.
    Raises:
        NotEquivalent: the graph's outputs differ from PyTorch's; nothing was left at ``dst_path``.
        UsageError: a bare weights file without ``config``, or flags that do not fit.
    Example:
        >>> to_onnx("gpt2-hf", "gpt2-onnx", src_format="hf", dtype="keep", verify=True, force=False).extra["task"]
        'text-generation-with-past'
    """
    from llmconv.conversion import ConvertReport
    from llmconv.export.exporters import plan_export, run_export
    from llmconv.export.onnx_post import finalize, rename_model
    from llmconv.export.tasks import is_seq2seq
    from llmconv.formats.hf import FORMAT as HF
    from llmconv.formats.hf import load_config
    from llmconv.transforms.common import install, scratch_near
    from llmconv.transforms.graph import record_data_files

    t0 = time.perf_counter()
    src, dst = Path(src_path), Path(dst_path)
    fmt_name = src_format if isinstance(src_format, str) else src_format.name
    if dtype not in ("keep", "fp32"):
        raise Unsupported(f"ONNX export writes float32 graphs; --dtype {dtype} is not an export option",
                          hint=f"export, then run `llmconv quantize MODEL.onnx OUT.onnx --method {dtype}`")
    to_file = dst.suffix.lower() == ".onnx" and not dst.is_dir()
    data_dst = dst.with_name(f"{dst.name}_data")
    if to_file and not force and (data_dst.exists() or data_dst.is_symlink()):
        raise DestinationError("the destination's external data file exists", path=data_dst,
                               hint="pass --force to replace it")
    if to_file:
        check_replaceable(dst, folder=False, force=force)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        with progress.phase("preparing the ONNX export (optimum)"):
            folder = _model_folder(src, fmt_name, config, stack, notes)
            plan = plan_export(load_config(folder), task=task, opset=opset, path=src)
        if is_seq2seq(plan.task):
            return _to_onnx_seq2seq(src, dst, plan, folder, stack, notes, fmt_name=fmt_name, to_file=to_file,
                                    verify=verify, force=force, external_data=external_data, provider=provider,
                                    decode_steps=decode_steps, generate=generate, t0=t0)
        if to_file:  # built in a scratch folder, then installed: the data files first, the model last
            scratch = Path(stack.enter_context(scratch_near(dst)))
            out_dir = scratch / "onnx"
        else:
            out_dir = Path(stack.enter_context(atomic_output(dst, folder=True, force=force)))
        run_export(plan, folder, out_dir)
        produced = out_dir / "model.onnx"
        if not produced.is_file():
            raise Unsupported(f"the {plan.exporter} exporter wrote no single model.onnx for task {plan.task}",
                              path=src, hint="this architecture/task splits into several graphs, "
                                             "which llmconv does not handle yet")
        with progress.phase("finishing the graph (external data, IR version)"):
            model_path = rename_model(produced, dst.name) if to_file else produced
            with HF.open(folder) as checkpoint:  # the weights the exporter read: their names go into the record
                post = finalize(model_path, data_name=f"{model_path.name}_data", external_data=external_data,
                                checkpoint=checkpoint)
        if post["ir_lowered_from"] is not None:
            notes.append(f"IR version lowered from {post['ir_lowered_from']} to {post['ir_version']}, the highest "
                         "the installed onnxruntime loads")
        verification = None
        if verify:
            if to_file:  # a failed check keeps it (and its data file) inside a keep_failed block
                keep_candidate(model_path, dst, folder=False)
            # The hf folder itself, so that messages name it (the runner makes its own view of it).
            verification = _gate(src if fmt_name == "hf" else folder, model_path, plan, src=src, dst=dst,
                                 provider=provider, decode_steps=decode_steps, generate=generate, fmt_name=fmt_name,
                                 t0=t0)
        record_data_files(model_path)  # what a later --force onto this model may remove
        if to_file:
            data_files = [model_path.parent / d for d in post["external_data"]]
            size = sum(p.stat().st_size for p in [model_path, *data_files])
            listed = [str(dst)] + [str(dst.with_name(p.name)) for p in data_files]
            final = scratch / "final"
            final.mkdir()
            for p in [model_path, *data_files]:
                os.replace(p, final / p.name)
            install(final, dst, folder=False, force=force, notes=notes)
            notes.append("config and tokenizer files are written only with a folder destination")
        else:
            everything = sorted(p for p in out_dir.rglob("*") if p.is_file())
            listed = [str(dst / p.relative_to(out_dir)) for p in everything]
            size = sum(p.stat().st_size for p in everything)
    if plan.exporter != "optimum":
        notes.append(f"optimum does not know {plan.model_type}: exported with torch.onnx, without past key/values")
    return ConvertReport(
        source=str(src), destination=str(dst), source_format=fmt_name, destination_format="onnx",
        weights_format=None, tensors=post["initializers"], parameters=post["parameters"], bytes_written=size,
        files=listed,
        dtype="float32", notes=notes, verification=verification, seconds=time.perf_counter() - t0,
        extra={"task": plan.task, "opset": plan.opset, "ir_version": post["ir_version"], "exporter": plan.exporter,
               "external_data": bool(post["external_data"])})


def _gate(reference: Path, candidate: Path, plan: ExportPlan, *, src: Path, dst: Path, provider: str,
          decode_steps: int | None, generate: int | None, fmt_name: str, t0: float) -> VerifyReport:
    """Verify the export (in the scratch folder) against PyTorch; raise, naming ``dst``, when it is not the model."""
    from llmconv.conversion import ConvertReport
    from llmconv.verification.outputs import compare_outputs, gate_hint

    with progress.phase("verifying the export against PyTorch"):
        verification = compare_outputs(reference, candidate, profile="auto", provider=provider, task=plan.task,
                                       decode_steps=decode_steps, generate=generate)
    verification.reference, verification.candidate = str(src), str(dst)

    def result() -> ConvertReport:  # what the command knows of the export it did not write
        return ConvertReport(source=str(src), destination=str(dst), source_format=fmt_name, destination_format="onnx",
                             weights_format=None, tensors=None, parameters=None, bytes_written=None, files=[],
                             dtype=None, verification=verification, seconds=time.perf_counter() - t0,
                             extra={"task": plan.task, "opset": plan.opset, "exporter": plan.exporter})

    crash = next((c for c in verification.checks if c.name == "runs" and not c.passed), None)
    if crash is not None:
        # "the candidate does not run in onnxruntime: <op> node <name>: <message>, on inputs of shape [1, 1]"
        raise NotEquivalent(f"the exported graph{crash.reason.removeprefix('the candidate')} ({plan.model_type}, "
                            f"exported with {plan.exporter} for {plan.task}); nothing was written",
                            report=verification, path=dst, result=result())
    if not verification.passed:
        verification.notes.append(gate_hint(src, dst))
        raise NotEquivalent(f"the exported graph's outputs differ from PyTorch's: {verification.summary()}; "
                            "nothing was written", report=verification, path=dst, result=result())
    return verification


def _to_onnx_seq2seq(src: Path, dst: Path, plan: ExportPlan, folder: Path, stack: contextlib.ExitStack,
                     notes: list[str], *, fmt_name: str, to_file: bool, verify: bool, force: bool,
                     external_data: bool, provider: str, decode_steps: int | None, generate: int | None,
                     t0: float) -> ConvertReport:
    """An encoder-decoder: optimum's layout, ``encoder_model.onnx`` and ``decoder_model_merged.onnx`` (or
    ``decoder_model.onnx`` without a cache), in a folder that ``ORTModelForSeq2SeqLM.from_pretrained`` loads."""
    from llmconv.conversion import ConvertReport
    from llmconv.export.exporters import run_export
    from llmconv.export.onnx_post import finalize
    from llmconv.formats.onnx import SEQ2SEQ_DECODERS, SEQ2SEQ_ENCODER, SEQ2SEQ_NO_RECORD
    from llmconv.transforms.graph import record_data_files

    if to_file:
        raise UsageError(f"{plan.model_type} is an encoder-decoder: it exports to two graphs ({SEQ2SEQ_ENCODER} and "
                         f"{SEQ2SEQ_DECODERS[0]}), which need a folder", path=dst,
                         hint=f"give a destination without the {dst.suffix} extension")
    out_dir = Path(stack.enter_context(atomic_output(dst, folder=True, force=force)))
    run_export(plan, folder, out_dir)
    merged = out_dir / SEQ2SEQ_DECODERS[0]
    if merged.is_file():
        # The merged decoder holds both of the others (the first step and the cached ones): shipping them too
        # would triple the decoder's bytes, and ORTModelForSeq2SeqLM loads the merged one first.
        for name in SEQ2SEQ_DECODERS[1:]:
            for p in (out_dir / name, out_dir / f"{name}_data"):
                p.unlink(missing_ok=True)
    graphs = [out_dir / n for n in (SEQ2SEQ_ENCODER, *SEQ2SEQ_DECODERS) if (out_dir / n).is_file()]
    if len(graphs) < 2 or graphs[0].name != SEQ2SEQ_ENCODER:
        raise Unsupported(f"the {plan.exporter} exporter wrote {', '.join(p.name for p in graphs) or 'no graph'} for "
                          f"{plan.model_type} ({plan.task}), not an encoder and a decoder", path=src)
    posts = {}
    for i, g in enumerate(graphs, 1):
        with progress.phase(f"finishing {g.name} ({i}/{len(graphs)})"):
            posts[g.name] = finalize(g, data_name=f"{g.name}_data", external_data=external_data,
                                     no_record=SEQ2SEQ_NO_RECORD)
        lowered = posts[g.name]["ir_lowered_from"]
        if lowered is not None:
            notes.append(f"{g.name}: IR version lowered from {lowered} to {posts[g.name]['ir_version']}, the highest "
                         "the installed onnxruntime loads")
    verification = None
    if verify:
        verification = _gate(src if fmt_name == "hf" else folder, out_dir, plan, src=src, dst=dst, provider=provider,
                             decode_steps=decode_steps, generate=generate, fmt_name=fmt_name, t0=t0)
    for g in graphs:
        record_data_files(g)
    everything = sorted(p for p in out_dir.rglob("*") if p.is_file())
    first = posts[graphs[0].name]
    return ConvertReport(
        source=str(src), destination=str(dst), source_format=fmt_name, destination_format="onnx",
        weights_format=None, tensors=sum(p["initializers"] for p in posts.values()),
        parameters=sum(p["parameters"] for p in posts.values()),
        bytes_written=sum(p.stat().st_size for p in everything),
        files=[str(dst / p.relative_to(out_dir)) for p in everything], dtype="float32", notes=notes,
        verification=verification, seconds=time.perf_counter() - t0,
        extra={"task": plan.task, "opset": plan.opset, "ir_version": first["ir_version"], "exporter": plan.exporter,
               "external_data": any(p["external_data"] for p in posts.values()),
               "graphs": [g.name for g in graphs]})


def _model_folder(src: Path, fmt_name: str, config: str | Path | None, stack: contextlib.ExitStack,
                  notes: list[str]) -> Path:
    """The folder the exporter reads: a ``transformers_view`` of ``src`` (or of a bare weights file and ``config``).

    The view holds links to the model's data files only, each checked by llmconv's readers first: the
    exporter never sees the folder's Python, nor a file that a link takes out of the folder (both noted).
    """
    from llmconv.export.tasks import WEIGHT_FILE_NAMES, transformers_view

    if fmt_name == "hf":
        if config is not None:
            raise UsageError("--config is for a bare weights file; this folder has its own config.json", path=src)
        return stack.enter_context(transformers_view(src, notes=notes))
    if fmt_name == "onnx":
        raise UsageError("the source is already ONNX", path=src,
                         hint="to get its weights out, convert it to a .safetensors or .bin file")
    if fmt_name not in WEIGHT_FILE_NAMES:
        raise Unsupported(f"cannot export {fmt_name} to ONNX", path=src)
    if config is None:
        raise UsageError("a bare weights file holds no architecture, and an ONNX graph needs the model's config",
                         path=src, hint="pass --config path/to/config.json, or convert the model's Hugging Face "
                                        "folder (config.json beside the weights)")
    cfg_path = Path(config)
    if cfg_path.is_dir():
        cfg_path = cfg_path / "config.json"
    if not cfg_path.is_file():
        raise InputError("no such config file", path=cfg_path, hint="--config takes a config.json")
    from llmconv.checkpoint import read_json

    parsed = read_json(cfg_path, what="config.json")
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise UsageError("--config is not a transformers config.json (no model_type)", path=cfg_path)
    # Links only: the system's temporary folder will do.
    return stack.enter_context(transformers_view(src if src.is_dir() else None, notes=notes, config=cfg_path,
                                                 weights_from=src))
