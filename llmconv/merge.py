"""Merge LoRA adapters into their base model: streamed one tensor at a time, verified before the rename.

The merged folder is the base's (config, tokenizer and generation files carried unchanged) with each changed
weight ``W + sum(weight_i * B_i @ A_i * scale_i)`` computed in float32 and stored in the base's dtype. Before it is
renamed into place it is checked twice: read back tensor by tensor against the merge llmconv computed (the tensors
no adapter touches bit-exact with the base), and run against the base with the adapters unmerged, by PEFT when it is
installed (the reference users trust) or by llmconv's own LoRA forward, on the same inputs, with the decode and
generation checks for a causal LM.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmconv import progress as status
from llmconv.adapters import (
    Adapter,
    encoder_decoder_refused,
    fit,
    merged_source,
    open_adapter,
    peft_version,
    reference_label,
)
from llmconv.checkpoint import dtype_name
from llmconv.errors import MissingDependency, NotEquivalent, UsageError
from llmconv.formats import registry
from llmconv.formats.registry import ProgressFn, WriteOptions
from llmconv.io import atomic_output, check_destination, check_free_space, parse_size
from llmconv.verification.report import VerifyReport
from llmconv.verification.weights import compare_weights

MERGE_SCHEMA = "llmconv.merge/1"
REFERENCES = ("auto", "peft", "llmconv")


@dataclass
class MergeReport:
    """What a merge did."""

    base: str
    adapters: list[dict[str, Any]]
    destination: str
    weights_format: str | None
    tensors: int | None
    parameters: int | None
    merged: list[str]
    replaced: list[str]
    bytes_written: int | None
    files: list[str]
    dtype: str | None
    reference: str | None
    notes: list[str] = field(default_factory=list)
    verification: VerifyReport | None = None
    weights_verification: VerifyReport | None = None
    unrounded_verification: VerifyReport | None = None  # an fp16/bf16 base: the merge checked at float32
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The ``llmconv.merge/1`` object, with the same keys on every exit."""
        ok = all(v is None or v.passed for v in (self.verification, self.weights_verification,
                                                 self.unrounded_verification))
        return {
            "schema": MERGE_SCHEMA, "ok": ok, "base": self.base, "adapters": self.adapters,
            "destination": self.destination, "destination_format": "hf", "weights_format": self.weights_format,
            "tensors": self.tensors, "parameters": self.parameters, "merged": self.merged, "replaced": self.replaced,
            "bytes_written": self.bytes_written, "files": self.files, "dtype": self.dtype,
            "reference": self.reference, "notes": self.notes, "seconds": round(self.seconds, 3),
            "verified": self.verification is not None and ok,
            "verification": self.verification.to_json() if self.verification is not None else None,
            "weights_verification": (self.weights_verification.to_json()
                                     if self.weights_verification is not None else None),
            "unrounded_verification": (self.unrounded_verification.to_json()
                                       if self.unrounded_verification is not None else None),
        }


def parse_weights(text: str | None, count: int) -> list[float]:
    """``--weights 1,0.5``: one finite number per adapter (default 1 each)."""
    if text is None:
        return [1.0] * count
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text!r} is not a comma-separated list of numbers",
                         hint="e.g. --weights 1,0.5 (one per adapter)") from None
    if len(values) != count:
        raise UsageError(f"--weights gives {len(values)} number(s) for {count} adapter(s)",
                         hint="give one weight per adapter, in the order the adapters are named")
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"--weights {text!r} holds a value that is not finite")
    return values


def merge(base: str | Path, adapters: list[str | Path], dst: str | Path, *, weights: list[float] | None = None,
          to: str | None = None, shard_size: str | int | None = None, verify: bool = True, force: bool = False,
          reference: str = "auto", progress: ProgressFn | None = None, decode_steps: int | None = None,
          generate: int | None = None) -> MergeReport:
    """Merge LoRA ``adapters`` into ``base`` and write the result at ``dst`` (an hf folder).

    Args:
        base: the base model's Hugging Face folder (config.json + weights).
        adapters: PEFT LoRA adapter folders, applied together.
        dst: the destination folder; written to a temporary name, renamed when complete and verified.
        weights: each adapter's factor (default 1).
        to: ``hf`` (default: the base's weight format), ``safetensors`` or ``pytorch`` (an hf folder with those
            weights).
        shard_size: largest shard (``"2GB"``); default: the base's largest shard when it is sharded, else one file.
        verify: check the written model before renaming it (weights read back, outputs against the unmerged
            reference).
        force: replace an existing destination.
        reference: who runs the unmerged reference: ``auto`` (PEFT when installed, else llmconv), ``peft``,
            ``llmconv``.
        progress: called with the number of bytes written.
        decode_steps: causal LMs: cached decode steps compared (None: the default, 0: off).
        generate: causal LMs: greedy tokens generated and compared per prompt (None: the default, 0: off).
    Returns:
        A MergeReport.
    Raises:
        InputError/Unsupported: an adapter that does not fit the base, or is not plain LoRA (exit 2).
        NotEquivalent: verification failed; nothing was left at ``dst``.
    Example:
        >>> merge("llama-hf", ["my-lora"], "llama-merged").merged[:1]
        ['model.layers.0.self_attn.q_proj.weight']
    """
    t0 = time.perf_counter()
    base_path, dst_path = Path(base), Path(dst)
    adapter_paths = [Path(a) for a in adapters]
    if not adapter_paths:
        raise UsageError("no adapter to merge", hint="llmconv merge BASE ADAPTER DST")
    factors = list(weights) if weights is not None else [1.0] * len(adapter_paths)
    if len(factors) != len(adapter_paths):
        raise UsageError(f"{len(factors)} weight(s) for {len(adapter_paths)} adapter(s)")
    if not all(math.isfinite(w) for w in factors):
        raise UsageError(f"adapter weights {factors} hold a value that is not finite")
    if reference not in REFERENCES:
        raise UsageError(f"unknown reference {reference!r}", hint="use auto, peft or llmconv")
    base_fmt = registry.detect(base_path)
    if base_fmt.name != "hf":
        what = "a PEFT adapter folder" if base_fmt.name == "peft" else f"a {base_fmt.name} checkpoint"
        raise UsageError(f"BASE must be a Hugging Face model folder (config.json + weights); this is {what}",
                         path=base_path, hint="llmconv merge BASE ADAPTER DST: the base model first, then the adapter")
    check_destination(base_path, dst_path, force=force, reads=adapter_paths)
    for a in adapter_paths:
        check_destination(a, dst_path, force=force)
    if to not in (None, "hf", "safetensors", "pytorch"):
        raise UsageError(f"merge writes a Hugging Face folder (--to hf, safetensors or pytorch), not {to}",
                         path=dst_path, hint=f"merge first, then: llmconv convert {dst_path} OUT --to {to}")
    registry.check_extension(dst_path, folder_hint="merge writes a folder")
    if registry.by_extension(dst_path) is not None and not dst_path.is_dir():
        raise UsageError(f"merge writes a Hugging Face folder, and DST names a {dst_path.suffix} file", path=dst_path,
                         hint=f"give a folder name; then llmconv convert FOLDER {dst_path.name} for one file")
    runtime = reference
    version = peft_version()
    if runtime == "auto":
        runtime = "peft" if version is not None else "llmconv"
    if runtime == "peft" and version is None and verify:
        raise MissingDependency("--reference peft needs PEFT, which is not installed",
                                hint="pip install 'llmconv[peft]', or use --reference llmconv")

    opened: list[Adapter] = []
    hf = registry.get("hf")
    with status.phase(f"reading {base_path.name} and {len(adapter_paths)} adapter(s)"):
        base_src = hf.open(base_path)
    try:
        from llmconv.architecture import describe, unavailable_reason
        from llmconv.export.tasks import refuse_model_code

        refuse_model_code(base_src.config or {}, path=base_path)
        for p, w in zip(adapter_paths, factors, strict=True):
            opened.append(open_adapter(p, weight=w))
        with status.phase("reading the base's architecture (transformers)"):
            arch = describe(base_src.config)
        notes: list[str] = []
        if arch is None:
            notes.append(f"the base's layer types are not known ({unavailable_reason(base_src.config)}): each LoRA "
                         "module is taken as a Linear (a Conv1D when fan_in_fan_out is set)")
        plan = fit(opened, base_src, arch.layers if arch is not None else None, arch.tied if arch is not None else (),
                   arch.prefix if arch is not None else "")
        if verify and (base_src.config or {}).get("is_encoder_decoder"):  # refused before anything is written
            raise encoder_decoder_refused(base_path)
        notes += _base_notes(base_src, opened)
        for ad in opened:
            own = sorted(f.name for f in ad.source.extra_files if f.name.startswith(("tokenizer", "special_tokens",
                                                                                    "vocab", "merges", "added_tokens")))
            if own:
                notes.append(f"{ad.path} ships tokenizer files ({', '.join(own)}); the merged folder carries the "
                             "base's (the adapter's shapes match the base's vocabulary)")
        weights_format = base_src.weights_format if to in (None, "hf") else to
        merged = merged_source(base_src, plan)
        summary = [_adapter_json(ad, plan) for ad in opened]
        label = reference_label(runtime)
        if runtime == "llmconv" and verify:
            notes.append("the reference is llmconv's own unmerged LoRA forward: " +
                         ("PEFT is not installed (pip install 'llmconv[peft]')" if version is None
                          else "--reference llmconv"))

        def report(size: int | None, files: list[str], verification: VerifyReport | None,
                   weights_check: VerifyReport | None, unrounded: VerifyReport | None = None) -> MergeReport:
            floats = sorted({dtype_name(i.dtype) for i in merged.infos.values() if i.dtype.is_floating_point})
            return MergeReport(
                base=str(base_path), adapters=summary, destination=str(dst_path), weights_format=weights_format,
                tensors=len(merged.infos) - len(merged.aliases), parameters=merged.num_parameters,
                merged=sorted(plan.updates), replaced=sorted(plan.replaced), bytes_written=size, files=files,
                dtype=",".join(floats) or None, reference=label if verify else None, notes=notes,
                verification=verification, weights_verification=weights_check, unrounded_verification=unrounded,
                seconds=time.perf_counter() - t0)

        check_free_space(dst_path, merged.total_bytes)
        shards = [f for f in base_src.files if not f.name.endswith(".json")]
        limit = parse_size(shard_size) if shard_size else (max(f.stat().st_size for f in shards) if len(shards) > 1
                                                             else None)
        options = WriteOptions(progress=progress, weights_format=weights_format, shard_size=limit)
        with atomic_output(dst_path, folder=True, force=force) as tmp:
            with status.phase(f"writing {dst_path.name} ({len(plan.updates)} merged tensors)"):
                files = hf.write(merged, tmp, folder=True, options=options)
            verification = weights_check = unrounded = None
            if verify:
                import torch

                from llmconv.adapters import rounded_reference, rounding_loss, unrounded_patch
                from llmconv.verification.outputs import compare_outputs

                rounded = sorted({dtype_name(merged.infos[n].dtype)
                                  for n in (*plan.updates, *plan.replaced) if merged.infos[n].dtype != torch.float32})
                # The written tensors against each merged tensor's float32 value cast to the base's dtype (computed
                # apart from the writer's rounding), the others against the base: all bit-exact.
                with status.phase("reading the merged weights back"), hf.open(tmp) as written:
                    weights_check = compare_weights(rounded_reference(base_src, plan), written, profile="exact")
                    loss = rounding_loss(base_src, plan, written) if rounded and weights_check.passed else 0.0
                weights_check.reference = f"the merge of {base_path} + {' + '.join(str(p) for p in adapter_paths)}"
                weights_check.candidate = str(dst_path)
                if not weights_check.passed:
                    raise NotEquivalent(f"the written weights differ from the merge: {weights_check.summary()}; "
                                        "nothing was written", report=weights_check, path=dst_path,
                                        result=report(None, [], None, weights_check))
                if rounded:
                    lost = "; most of the adapter is lost: merge into a float32 copy of the base" if loss > 0.5 else ""
                    notes.append(f"the base is {', '.join(rounded)}: rounding the merged tensors to it changed their "
                                 f"update by {loss:.1%} (by norm){lost}")

                def against_reference(patch: Any, profile: str) -> VerifyReport:
                    with status.phase(f"verifying {dst_path.name} against the unmerged adapters ({runtime})"):
                        v = compare_outputs(base_path, tmp, reference_adapters=opened, adapter_runtime=runtime,
                                            decode_steps=decode_steps, generate=generate, profile=profile,
                                            candidate_patch=patch)
                    v.reference = f"{base_path} + " + " + ".join(str(p) for p in adapter_paths)
                    v.candidate = str(dst_path)
                    v.extra["reference_runtime"] = label
                    return v

                # The written model, as users run it (an fp16/bf16 one at its dtype's profile).
                verification = against_reference(None, "auto")
                if rounded and verification.passed:
                    # That profile tolerates more than a small adapter changes: the merge's arithmetic is checked
                    # again at float32, its merged tensors before their rounding, against the same reference.
                    unrounded = against_reference(unrounded_patch(base_src, plan), "fp32")
                    unrounded.notes.append("the merged model ran with its merged tensors at float32 (before their "
                                           f"rounding to {', '.join(rounded)}), at the fp32 profile")
                for v in (verification, unrounded):
                    if v is not None and not v.passed:
                        what = "at float32, before its rounding, " if v is unrounded else ""
                        raise NotEquivalent(f"the merged model {what}differs from the base with the adapters "
                                            f"unmerged ({label}): {v.summary()}; nothing was written", report=v,
                                            path=dst_path, result=report(None, [], verification, weights_check,
                                                                         unrounded))
            rel = [str(dst_path / f.relative_to(tmp)) for f in files]
            size = sum(f.stat().st_size for f in files)
        return report(size, rel, verification, weights_check, unrounded)
    finally:
        for ad in opened:
            ad.close()
        base_src.close()


def _base_notes(base: Any, adapters: list[Adapter]) -> list[str]:
    """What the adapters' configs say of the base that this one may not be (its name), for the report."""
    notes = []
    name = base.config.get("_name_or_path") if base.config else None
    for ad in adapters:
        wanted = ad.config.get("base_model_name_or_path")
        if wanted and name and Path(str(wanted)).name != Path(str(name)).name:
            notes.append(f"{ad.path} was trained on {wanted!r}; the base's config says {name!r} (the shapes and "
                         "modules match)")
    return notes


def _adapter_json(ad: Adapter, plan: Any) -> dict[str, Any]:
    ranks = sorted({m.rank for m in ad.modules.values()})
    scales = sorted({round(m.scale, 6) for m in ad.modules.values()})
    return {"path": str(ad.path), "weight": ad.weight, "base_model": ad.config.get("base_model_name_or_path"),
            "r": ranks[0] if len(ranks) == 1 else ranks, "lora_alpha": ad.config.get("lora_alpha"),
            "use_rslora": bool(ad.config.get("use_rslora")), "scale": scales[0] if len(scales) == 1 else scales,
            "modules": len(ad.modules), "replaced": sorted(t for t, (a, _) in plan.replaced.items() if a is ad)}
