"""Convert a checkpoint from one format to another, verified before it is put in place."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmconv import progress as status
from llmconv.checkpoint import CAST_TARGETS, TensorSource, cast_source, dtype_name, is_output_head
from llmconv.errors import NotEquivalent, UsageError
from llmconv.formats import registry
from llmconv.formats.registry import Format, ProgressFn, WriteOptions
from llmconv.io import atomic_output, check_destination, check_free_space, human_size, parse_size
from llmconv.verification.report import VerifyReport
from llmconv.verification.weights import compare_weights, require_tensors

CONVERT_SCHEMA = "llmconv.convert/1"
# What an ONNX export adds to the report (``graphs``: an encoder-decoder's); None for other destinations.
EXPORT_KEYS = ("task", "opset", "ir_version", "exporter", "external_data", "graphs")


@dataclass
class Destination:
    """Where and how a conversion writes."""

    format: Format
    folder: bool
    weights_format: str | None = None


@dataclass
class ConvertReport:
    """What a conversion did."""

    source: str
    destination: str
    source_format: str | None
    destination_format: str | None
    weights_format: str | None
    tensors: int | None
    parameters: int | None
    bytes_written: int | None
    files: list[str]
    dtype: str | None
    cast: list[str] = field(default_factory=list)
    dropped_aliases: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    verification: VerifyReport | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``llmconv.convert/1`` object, with the same keys for every destination and on exit 1 (None where a
        field does not apply, e.g. ``task`` for a weights conversion, or is not known)."""
        out: dict[str, Any] = {
            "schema": CONVERT_SCHEMA, "ok": self.verification is None or self.verification.passed,
            "source": self.source, "destination": self.destination,
            "source_format": self.source_format, "destination_format": self.destination_format,
            "weights_format": self.weights_format, "tensors": self.tensors, "parameters": self.parameters,
            "bytes_written": self.bytes_written, "files": self.files, "dtype": self.dtype, "cast": self.cast,
            "aliases": self.aliases, "dropped_aliases": self.dropped_aliases, "notes": self.notes,
            "seconds": round(self.seconds, 3),
            "verified": self.verification is not None and self.verification.passed,
            "verification": self.verification.to_json() if self.verification is not None else None,
        }
        out.update({k: self.extra.get(k) for k in EXPORT_KEYS})
        out.update(self.extra)
        return out


def resolve_destination(src_fmt: Format, src: TensorSource | None, dst: Path, to: str | None) -> Destination:
    """Decide the destination format: ``to`` if given, else DST's extension, else the source's kind."""
    wants_folder = dst.is_dir() or registry.by_extension(dst) is None
    src_weights = src.weights_format if src is not None else None
    if src_fmt.name == "peft" and (to in (None, "peft", "safetensors", "pytorch")) and (wants_folder or to == "peft"):
        # An adapter stays an adapter folder PEFT loads: its config carried, the weights in the format asked for.
        weights = to if to in ("safetensors", "pytorch") else src_weights
        return Destination(registry.get("peft"), True, weights)
    if to is not None:
        fmt = registry.get(to)
        if fmt.name == "hf":
            return Destination(fmt, True, src_weights if src_weights in ("safetensors", "pytorch") else "safetensors")
        if wants_folder and src_fmt.name == "hf" and fmt.name in ("safetensors", "pytorch"):
            return Destination(registry.get("hf"), True, fmt.name)
        return Destination(fmt, (wants_folder and fmt.name != "onnx") or fmt.folder_only)
    by_ext = registry.by_extension(dst)
    if by_ext is not None and not dst.is_dir():
        return Destination(by_ext, False)
    if src_fmt.name == "hf":
        return Destination(src_fmt, True, src_weights)
    if src_fmt.name == "gguf":  # a model file: back to a Hugging Face folder when its architecture maps back
        if src is not None and src.config is not None:
            return Destination(registry.get("hf"), True, "safetensors")
        return Destination(registry.get("safetensors"), True)
    if src_fmt.writable:
        return Destination(src_fmt, True)
    raise UsageError(f"cannot tell which format to write at {dst}",
                     hint="give DST an extension (.safetensors, .bin, .onnx) or pass --to FORMAT")


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, dtype: str = "keep",
            shard_size: str | int | None = None, verify: bool = True, force: bool = False,
            progress: ProgressFn | None = None, **export_options: Any) -> ConvertReport:
    """Convert ``src`` to ``dst``; by default verify the written files against the source first.

    Args:
        src: a checkpoint file or folder.
        dst: the destination file or folder; written to a temporary name, renamed when complete.
        to: the destination format (``safetensors``, ``pytorch``, ``hf``, ``onnx``); default from DST.
        dtype: ``keep`` (lossless), or ``fp32``/``fp16``/``bf16`` for floating-point tensors.
        shard_size: largest shard, e.g. ``"2GB"``; needs a folder destination.
        verify: compare the output with the source (bit-exact after the cast) before renaming it.
        force: replace an existing destination.
        progress: called with the number of bytes written as the output grows.
        export_options: for ONNX destinations: task, opset, config, external_data, provider, decode_steps, generate.
    Returns:
        A ConvertReport.
    Raises:
        NotEquivalent: verification failed; nothing was left at ``dst``.
    Example:
        >>> convert("model.bin", "model.safetensors").bytes_written
    """
    t0 = time.perf_counter()
    src_path, dst_path = Path(src), Path(dst)
    src_fmt = registry.detect(src_path)
    check_destination(src_path, dst_path, force=force, reads=[export_options.get("config")])
    if to is None:
        registry.check_extension(dst_path, folder_hint="for a folder of that name pass --to FORMAT")
    if dtype != "keep" and dtype not in CAST_TARGETS:
        raise UsageError(f"unknown --dtype {dtype!r}", hint="use keep, fp32, fp16 or bf16")
    limit = parse_size(shard_size) if shard_size else None

    if (to or "") == "onnx" or (to is None and registry.by_extension(dst_path) is registry.get("onnx")):
        from llmconv.export import to_onnx

        if limit:
            raise UsageError("--shard-size applies to weights destinations; an ONNX graph keeps its weights in "
                             "one external data file", hint="drop --shard-size (or use --external-data)")
        return to_onnx(src_path, dst_path, src_format=src_fmt, dtype=dtype, verify=verify, force=force,
                       **export_options)
    if (to or "") == "gguf" or (to is None and registry.by_extension(dst_path) is registry.get("gguf")):
        return _to_gguf(src_path, dst_path, src_fmt=src_fmt, dtype=dtype, limit=limit, verify=verify, force=force,
                        progress=progress, t0=t0, **export_options)
    if export_options.get("config") or export_options.get("task") or export_options.get("opset"):
        raise UsageError("--task, --opset and --config apply to ONNX destinations only")
    if export_options.get("decode_steps") is not None or export_options.get("generate") is not None:
        raise UsageError("--decode-steps and --generate apply to an ONNX export's verification (a weights "
                         "conversion is verified tensor by tensor)", hint="compare outputs with llmconv verify "
                                                                          "--mode outputs")

    with status.phase(f"reading {src_path.name}"):
        opened = src_fmt.open(src_path)
    with opened as source:
        require_tensors(source, what="convert")
        if src_fmt.name == "gguf":
            from llmconv.formats.gguf import refuse_unreadable

            refuse_unreadable(source)
        dest = resolve_destination(src_fmt, source, dst_path, to)
        if src_fmt.name == "gguf" and dest.format.name in ("hf", "gguf"):
            from llmconv.formats.gguf import refuse_unmapped

            refuse_unmapped(source, what=f"a{'n hf folder' if dest.format.name == 'hf' else ' GGUF'} written from it")
        if (not dest.format.writable or (dest.format.name == "peft" and src_fmt.name != "peft")
                or (src_fmt.name == "peft" and dest.format.name not in ("peft", "safetensors", "pytorch"))):
            raise UsageError(f"llmconv does not write {dest.format.name} from {src_fmt.name}",
                             hint="a LoRA adapter folder is written from an adapter folder; to apply an adapter to "
                                  "its base, use llmconv merge BASE ADAPTER DST" if "peft" in (dest.format.name,
                                                                                             src_fmt.name) else None)
        named: list[str] = []
        if src_fmt.name == "onnx":  # initializer names, or the checkpoint's through the graph's name record
            from llmconv.formats.onnx import restore_names

            source, named = restore_names(source, for_hf=dest.format.name == "hf")
        if dest.format.name == "hf" and source.config is None:
            raise UsageError(f"an hf folder needs a config.json, and {src_path} has none", path=dst_path,
                             hint="write a weights folder instead (--to safetensors or --to pytorch)")
        view, cast = (source, []) if dtype == "keep" else cast_source(source, CAST_TARGETS[dtype])
        # The hf reader's notes say which folder files it leaves out (links that leave the folder, ...).
        # (A GGUF reader's notes say which tensors keep their GGUF names, which dtypes it restored.)
        notes = (list(source.details.get("notes", [])) if dest.format.name in ("hf", "peft") or src_fmt.name == "gguf"
                 else []) + named
        if dest.format.name not in ("hf", "peft") and (source.config is not None or src_fmt.name == "peft"):
            notes.append(f"{'adapter_config.json' if src_fmt.name == 'peft' else 'config.json'} and other folder "
                         "files are not carried into a single weights file")
        if source.metadata and (dest.weights_format or dest.format.name) == "pytorch":
            notes.append(f"PyTorch state dicts hold no metadata: dropped {sorted(source.metadata)}")
        stores_aliases = (dest.weights_format or dest.format.name) == "pytorch"
        dropped = {} if stores_aliases else view.left_out()
        copied = {} if stores_aliases else {a: c for a, c in view.aliases.items() if a not in dropped}
        notes += tie_notes(view, dropped, copied)
        if limit and not dest.folder and view.total_bytes > limit:
            # Checked here, not in the writer, so the message names DST rather than its temporary name.
            raise UsageError(f"--shard-size {shard_size} needs a folder destination (the model is larger than "
                             "one shard)", path=dst_path,
                             hint=f"give a destination without the {dst_path.suffix} extension")
        options = WriteOptions(shard_size=limit, progress=progress, weights_format=dest.weights_format)
        check_free_space(dst_path, view.total_bytes)
        with atomic_output(dst_path, folder=dest.folder, force=force) as tmp:
            cast_to = f" ({dtype})" if cast else ""
            with status.phase(f"writing {dst_path.name}{cast_to}"):
                files = dest.format.write(view, tmp, folder=dest.folder, options=options)
            verification = None

            def report(bytes_written: int | None, written_files: list[str]) -> ConvertReport:
                """This conversion's report; on exit 1 with nothing written (``None``, ``[]``)."""
                return ConvertReport(
                    source=str(src_path), destination=str(dst_path), source_format=src_fmt.name,
                    destination_format=dest.format.name, weights_format=dest.weights_format,
                    tensors=len(view.infos) - len(view.aliases), aliases=dict(view.aliases),
                    parameters=view.num_parameters, bytes_written=bytes_written, files=written_files,
                    dtype=dtype if dtype == "keep" else dtype_name(CAST_TARGETS[dtype]), cast=cast,
                    dropped_aliases=dropped, notes=notes, verification=verification,
                    seconds=time.perf_counter() - t0)

            if verify:
                with status.phase(f"verifying {dst_path.name} against the source"), \
                        dest.format.open(tmp) as written:
                    if written.config is None:
                        # A bare weights file is this model's, loaded with its config: the ties that let
                        # names be left out are the config's (what from_pretrained applies to it).
                        written.config = view.config
                    verification = compare_weights(view, written, profile="exact")
                    verification.reference, verification.candidate = str(src_path), str(dst_path)
                if not verification.passed:
                    raise NotEquivalent(
                        f"written output differs from the source: {verification.summary()}; nothing was written",
                        report=verification, path=dst_path, result=report(None, []))
            rel = [str(dst_path / f.relative_to(tmp)) if dest.folder else str(dst_path) for f in files]
            size = sum(f.stat().st_size for f in files)
        return report(size, rel)


def _to_gguf(src_path: Path, dst_path: Path, *, src_fmt: Format, dtype: str, limit: int | None, verify: bool,
             force: bool, progress: ProgressFn | None, t0: float, **options: Any) -> ConvertReport:
    """``convert HF X.gguf``: float dtypes kept (or cast with ``dtype``), verified tensor by tensor and through
    transformers' GGUF loader before the rename."""
    from llmconv.transforms.gguf_out import weights_note, write_gguf_verified

    if limit:
        raise UsageError("--shard-size does not apply to GGUF: llmconv writes one file", path=dst_path)
    if options.get("config") or options.get("task") or options.get("opset"):
        raise UsageError("--task, --opset and --config apply to ONNX destinations only")
    if dst_path.is_dir():
        raise UsageError("a GGUF model is one file, and DST is a folder", path=dst_path, hint="give DST a .gguf name")
    outputs = {k: options[k] for k in ("decode_steps", "generate") if options.get(k) is not None}

    def report(result: Any, *, written: bool) -> ConvertReport:
        verification = result.verification
        out = ConvertReport(
            source=str(src_path), destination=str(dst_path), source_format=src_fmt.name, destination_format="gguf",
            weights_format="gguf", tensors=result.tensors, parameters=result.parameters,
            bytes_written=result.bytes_written if written else None, files=result.files if written else [],
            dtype=dtype if dtype == "keep" else dtype_name(CAST_TARGETS[dtype]), cast=result.cast,
            notes=list(result.notes) + list(verification.notes if verification is not None else []),
            verification=verification, seconds=time.perf_counter() - t0)
        out.extra["gguf_types"] = result.types
        if result.outputs is not None and result.weights is not None:
            out.extra["weights_verification"] = result.weights.to_json()
            out.notes.insert(0, weights_note(result.weights))
        return out

    result = write_gguf_verified(src_path, dst_path, method=None, dtype=dtype, verify=verify, force=force,
                                 progress=progress, outputs_options=outputs,
                                 failed=lambda r: report(r, written=False))
    return report(result, written=True)


def tie_notes(src: TensorSource, dropped: dict[str, str], copied: dict[str, str]) -> list[str]:
    """Say which tied names a format without shared storage leaves out, which it writes as copies, and why.

    Args:
        src: the source (its config says what the model ties, :mod:`llmconv.architecture`).
        dropped: alias -> the name stored, for the aliases left out.
        copied: alias -> the name it shares storage with, for the aliases written as tensors of their own.
    Returns:
        One note per stored name with left-out aliases, then one per copy.
    """
    from llmconv.architecture import describe, unavailable_reason

    arch = None
    if src.config is not None and (dropped or copied):
        # Only tied names have anything to explain; building the class (importing transformers, a second
        # or more) is skipped for a checkpoint without them, whose notes cannot change.
        with status.phase("reading the architecture (transformers)"):
            arch = describe(src.config)
    notes = []
    by_canon: dict[str, list[str]] = {}
    for alias, canon in dropped.items():
        by_canon.setdefault(canon, []).append(alias)
    for canon, aliases in by_canon.items():
        names = ", ".join(sorted(aliases))
        if arch is not None and all(arch.ties(a, canon) for a in aliases):
            why = (f"{arch.model_class} makes {'it' if len(aliases) == 1 else 'them'} one parameter with {canon} "
                   "(tie_weights), so from_pretrained ties them again on load")
        elif src.config is not None:
            why = "the config ties the output head to the input embedding, so from_pretrained ties them again on load"
        else:
            why = "no config.json: an output head sharing the embedding's storage is left out, as save_pretrained " \
                  "leaves out a tied head"
        notes.append(f"{names} {'is' if len(aliases) == 1 else 'are'} stored once, as {canon}: {why}")
    for alias, canon in copied.items():
        extra = human_size(src.infos[alias].nbytes)
        if arch is not None and (arch.own_name(alias) or arch.own_name(canon)):
            why = (f"the config does not tie them ({arch.model_class} keeps them as separate parameters), so leaving "
                   "it out would load it uninitialised")
        elif src.config is None:
            why = "there is no config.json to say that the model ties it again on load"
        elif is_output_head(alias):
            why = "the config does not tie them"
        else:
            why = f"nothing says the model ties it again on load ({unavailable_reason(src.config)})"
        notes.append(f"{alias} shares storage with {canon} in the source, and safetensors cannot share: it is "
                     f"written as a copy ({extra}), since {why}")
    return notes
