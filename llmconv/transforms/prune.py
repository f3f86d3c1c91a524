"""Magnitude pruning of a model's linear-layer weights, with the achieved sparsity and quality checked.

Patterns:

- ``unstructured``: in each pruned weight, the ``sparsity`` fraction of entries with the smallest
  magnitude become zero (ties broken by position, so runs are deterministic).
- ``2:4``: in every group of four consecutive weights along the input dimension, the two smallest
  become zero: exactly half, in the layout GPU sparse tensor cores take. ``sparsity`` is 0.5.
- ``rows``: the ``sparsity`` fraction of output rows (output features) with the smallest L2 norm
  become zero. Shapes are kept, so the model still loads everywhere; a zeroed row's output is just
  the layer's bias. Physically removing rows would change the architecture (config, next layer).

By default the linear layers' weights are pruned: 2-D floating-point ``*.weight`` tensors of
safetensors/PyTorch/hf checkpoints, and the float32 weights of MatMul/Gemm nodes of ONNX graphs.
Embeddings (every ``nn.Embedding`` of the model's class, T5's ``relative_attention_bias`` included), the
output head (``lm_head``), what is tied to them, norms and biases are left alone; ``include`` and
``exclude`` (shell-style name patterns, matched against tensor names and, for ONNX, node names)
change the selection.

Weight formats stream through the format writers one tensor at a time (a view whose loader prunes
each tensor); ONNX models are edited as a copy (external data kept external) and written
atomically. Every output is checked before it is renamed into place: the written tensors equal the
pruned ones, each pruned tensor meets its pattern, and, for models that can run (hf folders and
ONNX), the outputs are compared with the source's against the quality thresholds.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmconv import progress as status
from llmconv.errors import NotEquivalent, Unsupported, UsageError
from llmconv.io import atomic_output, check_destination, keep_candidate
from llmconv.verification.report import Check, VerifyReport

if TYPE_CHECKING:
    import torch

    from llmconv.checkpoint import TensorSource

PRUNE_SCHEMA = "llmconv.prune/1"
PATTERNS = ("unstructured", "2:4", "rows")
# Quality thresholds used when the user gives none: outputs must stay finite, the most likely next
# token must mostly agree with the source's, and perplexity on --text may rise by at most this much.
DEFAULT_MIN_TOP1 = 0.5
DEFAULT_MAX_PPL_INCREASE = 0.5
# transformers models whose linear layers are Conv1D: weight [in, out] rather than Linear's [out, in].
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
_CONV1D_LEAVES = {"c_attn", "c_proj", "c_fc", "q_attn"}
# Embeddings and output heads by name: only where the model's class cannot be read (no config.json, no
# transformers, an unknown model_type); otherwise llmconv.architecture says which they are.
_EMBEDDING_RE = re.compile(r"(^|\.)(embed\w*|wte|wpe|\w*_embeddings|shared|embeddings)(\.|$)")
_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out|score|classifier)(\.|$)|^output\.weight$")


@dataclass
class PrunedTensor:
    """One pruned weight: its achieved sparsity and whether it meets the pattern."""

    name: str
    shape: list[int]
    zeros: int
    numel: int
    in_axis: int
    node: str | None = None
    pattern_ok: bool = True

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": self.shape, "sparsity": round(self.sparsity, 6),
                               "zeros": self.zeros, "numel": self.numel, "pattern_ok": self.pattern_ok}
        if self.node:
            out["node"] = self.node
        return out


@dataclass
class PruneReport:
    """What pruning did: per-tensor and overall sparsity, the integrity check and the quality check.

    Attributes:
        sparsity: the requested fraction (0.5 for 2:4).
        tensors: the pruned tensors, as measured in the written output.
        skipped: tensors a user pattern selected but that cannot be pruned, and the embeddings and
            output head the default selection leaves alone, each with the reason.
        verification: written tensors equal the pruned ones, and meet the pattern (weights mode).
        quality: the outputs of the pruned model against the source's, judged by ``thresholds``
            (None when the model cannot run: a bare weights file).
        thresholds: min_top1 and max_ppl_increase used.
    """

    source: str
    destination: str
    source_format: str
    pattern: str
    sparsity: float
    tensors: list[PrunedTensor]
    files: list[str]
    bytes_written: int | None
    parameters: int = 0
    destination_format: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    verification: VerifyReport | None = None
    quality: VerifyReport | None = None
    thresholds: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float | None = 0.0

    @property
    def overall(self) -> float:
        """Zeros over all entries of the pruned tensors."""
        numel = sum(t.numel for t in self.tensors)
        return sum(t.zeros for t in self.tensors) / numel if numel else 0.0

    @property
    def model_sparsity(self) -> float:
        """Zeros of the pruned tensors over all the model's parameters."""
        return sum(t.zeros for t in self.tensors) / self.parameters if self.parameters else 0.0

    @property
    def passed(self) -> bool:
        return all(r is None or r.passed for r in (self.verification, self.quality))

    def to_json(self) -> dict[str, Any]:
        """The ``llmconv.prune/1`` object, with the same keys for every format and on exit 1 (``quality`` None where
        the model cannot run, or was not reached)."""
        return {
            "schema": PRUNE_SCHEMA, "ok": self.passed, "source": self.source, "destination": self.destination,
            "source_format": self.source_format, "destination_format": self.destination_format,
            "pattern": self.pattern, "sparsity": self.sparsity,
            "achieved": {"overall": round(self.overall, 6), "model": round(self.model_sparsity, 6),
                         "tensors": len(self.tensors), "parameters": self.parameters},
            "tensors": [t.to_json() for t in self.tensors], "skipped": self.skipped, "files": self.files,
            "bytes_written": self.bytes_written, "thresholds": self.thresholds, "notes": self.notes,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "verified": self.verification is not None and self.verification.passed
                        and (self.quality is None or self.quality.passed),
            "verification": self.verification.to_json() if self.verification is not None else None,
            "quality": self.quality.to_json() if self.quality is not None else None,
        }


# ---- the masks -----------------------------------------------------------------------------------


def check_sparsity(sparsity: float | None, pattern: str) -> float:
    """The sparsity to use for ``pattern``; 2:4 is always 0.5."""
    if pattern not in PATTERNS:
        raise UsageError(f"unknown --pattern {pattern!r}", hint="use unstructured, 2:4 or rows")
    if pattern == "2:4":
        if sparsity is not None and not math.isclose(sparsity, 0.5):
            raise UsageError(f"--pattern 2:4 zeroes exactly half of the weights; --sparsity {sparsity} cannot apply",
                             hint="leave --sparsity out, or give 0.5")
        return 0.5
    if sparsity is None:
        raise UsageError(f"--pattern {pattern} needs --sparsity FRACTION", hint="for example --sparsity 0.5")
    if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise UsageError(f"--sparsity {sparsity} is not a fraction in [0, 1)", hint="for example --sparsity 0.5")
    return float(sparsity)


def prune_tensor(t: torch.Tensor, *, sparsity: float, pattern: str, in_axis: int = 1,
                 name: str = "tensor") -> torch.Tensor:
    """Magnitude-prune one 2-D weight; returns a new tensor of the same dtype and shape.

    Args:
        t: the weight.
        sparsity: fraction to zero (unstructured: of entries; rows: of output rows; 2:4: 0.5).
        pattern: ``unstructured``, ``2:4`` or ``rows``.
        in_axis: the axis along the layer's input features (1 for Linear ``[out, in]``, 0 for
            Conv1D and ONNX MatMul weights ``[in, out]``).
        name: for error messages.
    Returns:
        The pruned tensor.
    Example:
        >>> prune_tensor(torch.tensor([[1., -4., 2., 3.]]), sparsity=0.5, pattern="2:4").tolist()
        [[0.0, -4.0, 0.0, 3.0]]
    """
    import torch

    if t.ndim != 2:
        raise Unsupported(f"tensor {name!r} has shape {list(t.shape)}; pruning takes 2-D weights")
    mag = t.detach().abs().to(torch.float32)
    if pattern == "unstructured":
        k = round(sparsity * t.numel())
        keep = torch.ones(t.numel(), dtype=torch.bool)
        if k:
            order = torch.argsort(mag.reshape(-1), stable=True)
            keep[order[:k]] = False
        mask = keep.view(t.shape)
    elif pattern == "2:4":
        n_in = t.shape[in_axis]
        if n_in % 4:
            raise Unsupported(f"tensor {name!r} has {n_in} input features, not a multiple of 4, so it cannot "
                              "be pruned 2:4", hint=f"exclude it (--exclude '{name}') or use --pattern unstructured")
        rows = mag.movedim(in_axis, -1).contiguous()  # [out, in]
        groups = rows.reshape(-1, 4)
        smallest = torch.argsort(groups, dim=1, stable=True)[:, :2]
        keep = torch.ones_like(groups, dtype=torch.bool)
        keep.scatter_(1, smallest, False)
        mask = keep.reshape(rows.shape).movedim(-1, in_axis)
    elif pattern == "rows":
        out_axis = 1 - in_axis
        norms = mag.pow(2).sum(dim=in_axis)  # one per output row
        k = round(sparsity * t.shape[out_axis])
        keep_rows = torch.ones(t.shape[out_axis], dtype=torch.bool)
        if k:
            keep_rows[torch.argsort(norms, stable=True)[:k]] = False
        mask = keep_rows.unsqueeze(in_axis).expand(t.shape)
    else:
        raise UsageError(f"unknown pattern {pattern!r}", hint="use unstructured, 2:4 or rows")
    return t.masked_fill(~mask, 0)


def pattern_holds(t: torch.Tensor, *, sparsity: float, pattern: str, in_axis: int) -> bool:
    """Whether ``t`` meets ``pattern`` at ``sparsity`` (used on the written output)."""
    import torch

    zero = t == 0
    if pattern == "unstructured":
        return int(zero.sum()) >= round(sparsity * t.numel())
    if pattern == "2:4":
        groups = zero.movedim(in_axis, -1).contiguous().reshape(-1, 4)
        return bool((groups.sum(dim=1) >= 2).all())
    out_axis = 1 - in_axis
    zero_rows = int(torch.all(zero, dim=in_axis).sum())
    return zero_rows >= round(sparsity * t.shape[out_axis])


def _matches(patterns: list[str], *names: str | None) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)


# ---- the public function -------------------------------------------------------------------------------


def prune(src: str | Path, dst: str | Path, *, sparsity: float | None = None, pattern: str = "unstructured",
          include: list[str] | None = None, exclude: list[str] | None = None, text: str | Path | None = None,
          inputs: str | Path | None = None,
          min_top1: float | None = None, max_ppl_increase: float | None = None, provider: str = "cpu",
          verify: bool = True, force: bool = False, progress: Any = None, decode_steps: int | None = None,
          generate: int | None = None) -> PruneReport:
    """Magnitude-prune the linear-layer weights of ``src`` and write the result at ``dst``.

    Args:
        src: a safetensors/PyTorch file or folder, an hf folder, or an ONNX model.
        dst: the destination, in the source's format (a file or folder as for ``convert``; for
            ONNX a ``.onnx`` file or a folder).
        sparsity: fraction to prune (of entries for unstructured, of output rows for rows); 2:4 is 0.5.
        pattern: ``unstructured``, ``2:4`` or ``rows``.
        include: name patterns (``fnmatch``) choosing the tensors to prune instead of the default
            (every linear weight but the embeddings and the output head).
        exclude: name patterns of tensors to leave alone.
        text: also compare perplexity of both models on this text (causal LMs).
        inputs: run the quality check on these inputs (.npz of name -> array) instead of synthetic ones.
        min_top1: quality: least top-1 agreement of the logits with the source's (default 0.5).
        max_ppl_increase: quality: largest relative perplexity increase on ``text`` (default 0.5).
        provider: onnxruntime execution provider for the quality check of ONNX models.
        verify: check the written output (tensors, pattern, quality) before renaming it into place.
        force: replace an existing destination.
        progress: called with bytes written (weight formats).
        decode_steps: causal LMs: cached decode steps the quality check compares (None: 4, 0: off).
        generate: causal LMs: greedy tokens per prompt the quality check reports (None: 6, 0: off).
    Returns:
        A PruneReport.
    Raises:
        NotEquivalent: a check failed; nothing was left at ``dst``.
    Example:
        >>> prune("model.safetensors", "pruned.safetensors", sparsity=0.5).overall
        0.5
    """
    from llmconv.formats import registry

    t0 = time.perf_counter()
    sparsity = check_sparsity(sparsity, pattern)
    if not verify:
        for flag, given in (("--text", text), ("--inputs", inputs), ("--min-top1", min_top1),
                            ("--max-ppl-increase", max_ppl_increase)):
            if given is not None:
                raise UsageError(f"{flag} sets the quality check, and --no-verify skips it",
                                 hint=f"drop {flag} or --no-verify")
    for label, value in (("--min-top1", min_top1), ("--max-ppl-increase", max_ppl_increase)):
        if value is not None and (value < 0 or math.isnan(value) or (label == "--min-top1" and value > 1)):
            raise UsageError(f"{label} {value} is out of range", hint="give a fraction, e.g. 0.9 or 0.05")
    src_path, dst_path = Path(src), Path(dst)
    fmt = registry.detect(src_path)
    check_destination(src_path, dst_path, force=force, reads=[text, inputs])
    registry.check_extension(dst_path, folder_hint="for a folder, give a name without this suffix")
    thresholds = {"min_top1": DEFAULT_MIN_TOP1 if min_top1 is None else min_top1,
                  "max_ppl_increase": DEFAULT_MAX_PPL_INCREASE if max_ppl_increase is None else max_ppl_increase}
    selection = {"include": list(include or []), "exclude": list(exclude or [])}
    checks = {"text": text, "inputs": inputs, "decode_steps": decode_steps, "generate": generate}
    if (text is not None or inputs is not None) and fmt.name not in ("hf", "onnx"):
        raise UsageError(f"--text/--inputs run the model, and a bare {fmt.name} weights file cannot run",
                         path=src_path,
                         hint="prune the hf model folder or an ONNX model to check quality on text")
    if text is not None:
        from llmconv.export.tasks import refuse_tokenizer_code
        from llmconv.formats.onnx import model_file

        # The text is tokenized with the source's own tokenizer files: refuse one that needs the folder's code
        # before any pruning is done.
        refuse_tokenizer_code(src_path if fmt.name == "hf" else model_file(src_path).parent)
    if fmt.name == "onnx":
        report = _prune_onnx(src_path, dst_path, sparsity=sparsity, pattern=pattern, selection=selection,
                             checks=checks, thresholds=thresholds, provider=provider, verify=verify, force=force)
    else:
        report = _prune_weights(src_path, dst_path, fmt=fmt, sparsity=sparsity, pattern=pattern,
                                selection=selection, checks=checks, thresholds=thresholds, verify=verify,
                                force=force,
                                progress=progress)
    report.thresholds = thresholds
    report.seconds = time.perf_counter() - t0
    return report


# ---- weight formats ------------------------------------------------------------------------------


def _nothing_selected(src_path: Path, skipped: list[dict] | None = None) -> UsageError:
    if skipped:
        first = skipped[0]
        return UsageError(f"no tensor was selected for pruning ({first['name']}: {first['reason']})",
                          path=src_path)
    return UsageError("no tensor was selected for pruning", path=src_path,
                      hint="check --include/--exclude; `llmconv inspect` lists the tensor names (a tied output "
                           "head such as GPT-2's lm_head.weight is stored as the input embedding)")


def _leaf(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def in_axes(names: list[str], src: TensorSource) -> tuple[dict[str, int], str | None]:
    """The input axis of each weight: 1 for Linear ([out, in]), 0 for transformers' Conv1D ([in, out]).

    Only GPT-2's family stores its attention and MLP layers (c_attn, c_proj, c_fc, q_attn) as Conv1D;
    its output head and every layer of other models (GPTBigCode and StarCoder2 use the same names
    for Linear layers) are Linear. The config's model_type says which family a folder is; a bare
    weights file is told by its MLP up-projection, which widens: Conv1D stores it [in, out] with
    fewer rows than columns.

    Returns:
        name -> axis, and a note saying how a bare file was read (None with a config).
    """
    note = None
    if src.config is not None:
        conv1d = src.config.get("model_type") in CONV1D_MODEL_TYPES
    else:
        fc = next((n for n in src.infos if _leaf(n) == "c_fc" and len(src.infos[n].shape) == 2), None)
        conv1d = fc is not None and src.infos[fc].shape[0] < src.infos[fc].shape[1]
        if any(_leaf(n) in _CONV1D_LEAVES for n in names):
            seen = f"{fc} is {'x'.join(map(str, src.infos[fc].shape))}" if fc else ""
            if conv1d:
                note = f"no config.json: {seen}, [in, out], so c_attn/c_proj/c_fc were read as GPT-2 Conv1D weights"
            else:
                note = "no config.json: c_attn/c_proj/c_fc were read as Linear weights [out, in]"
                note += f" ({seen})" if seen else ""
    return {n: 0 if conv1d and _leaf(n) in _CONV1D_LEAVES else 1 for n in names}, note


def select_weights(src: TensorSource, *, include: list[str], exclude: list[str]) -> tuple[list[str], list[dict]]:
    """The names to prune, and the ones left alone that a user pattern named or that are embeddings (with why).

    By default every 2-D floating-point ``*.weight`` is pruned but the embeddings and the output head:
    with a config, those the model's class says (:func:`llmconv.architecture.describe`: the parameters of
    every ``nn.Embedding``, the input and output embeddings, the task head, and whatever is tied to them);
    without one (a bare weights file), or where the class cannot be read or lacks the name, those the
    names suggest.
    ``include`` replaces that default; ``exclude`` is applied last.
    """
    from llmconv.architecture import describe

    arch = describe(src.config) if src.config is not None else None
    chosen, skipped = [], []
    for name, info in src.infos.items():
        if name in src.aliases:
            if include and _matches(include, name) and not _matches(exclude, name):
                canon = src.aliases[name]
                skipped.append({"name": name, "reason": f"tied to {canon}, stored once: --include {canon} "
                                                        "prunes both"})
            continue
        if include:
            if not _matches(include, name):
                continue
        elif not name.endswith("weight"):
            continue
        elif (why := _left_alone(name, src, arch)) is not None:
            if len(info.shape) == 2 and info.dtype.is_floating_point and not _matches(exclude, name):
                skipped.append({"name": name, "reason": why})
            continue
        if _matches(exclude, name):
            continue
        if len(info.shape) != 2 or not info.dtype.is_floating_point:
            if include:
                skipped.append({"name": name, "reason": f"{len(info.shape)}-D {info.dtype} is not a 2-D "
                                                        "floating-point weight"})
            continue
        chosen.append(name)
    return chosen, skipped


def _left_alone(name: str, src: TensorSource, arch: Any) -> str | None:
    """Why the default selection leaves ``name`` alone (an embedding, the output head, tied), or None."""
    if arch is not None and arch.own_name(name) is not None:
        if (what := arch.embedding_of(name)) is not None:
            return f"an embedding of {arch.model_class}: {what}; embeddings are not pruned"
        if (what := arch.head_of(name)) is not None:
            return f"{what}; the output head is not pruned"
    else:
        from llmconv.architecture import unavailable_reason

        # Names are all there is to go by: no config, a class that cannot be read, or a name it lacks.
        unknown = (f"{arch.model_class} has no parameter of this name" if arch is not None
                   else unavailable_reason(src.config))
        if _EMBEDDING_RE.search(name):
            return f"an embedding by its name ({unknown}); embeddings are not pruned"
        if _HEAD_RE.search(name):
            return f"the output head by its name ({unknown}); the output head is not pruned"
    tied = sorted(a for a, c in src.aliases.items() if c == name)
    if tied:
        return f"shares its storage with {', '.join(tied)}: pruning it would prune {'it' if len(tied) == 1 else 'them'}"
    return None


def _prune_weights(src_path: Path, dst_path: Path, *, fmt: Any, sparsity: float, pattern: str,
                   selection: dict[str, list[str]], checks: dict[str, Any], thresholds: dict[str, float | None],
                   verify: bool, force: bool, progress: Any) -> PruneReport:
    from llmconv.checkpoint import TensorSource
    from llmconv.conversion import resolve_destination
    from llmconv.formats.registry import WriteOptions
    from llmconv.transforms.common import rename_paths
    from llmconv.verification.weights import compare_weights

    notes: list[str] = []
    with fmt.open(src_path) as source:
        dest = resolve_destination(fmt, source, dst_path, None)
        if not dest.format.writable or dest.format.name == "onnx":
            raise UsageError(f"pruned {fmt.name} weights cannot be written as {dest.format.name}", path=dst_path,
                             hint="write them in the source's format (same extension, or a folder)")
        chosen, skipped = select_weights(source, include=selection["include"], exclude=selection["exclude"])
        if not chosen:
            raise _nothing_selected(src_path, skipped)
        axes, axis_note = in_axes(chosen, source)
        if axis_note and pattern != "unstructured":
            notes.append(axis_note)
        if dest.format.name == "hf":  # the folder files the hf reader leaves out, and why
            notes.extend(source.details.get("notes", []))
        pruned_names = set(chosen)
        by_alias = {a: c for a, c in source.aliases.items() if c in pruned_names}
        measured: dict[str, PrunedTensor] = {}

        def load(name: str) -> torch.Tensor:
            canon = by_alias.get(name, name)
            t = source.tensor(canon)
            if canon not in pruned_names:
                return t
            out = prune_tensor(t, sparsity=sparsity, pattern=pattern, in_axis=axes[canon], name=canon)
            measured[canon] = PrunedTensor(canon, list(out.shape), int((out == 0).sum()), out.numel(), axes[canon])
            return out

        view = TensorSource(format=source.format, path=source.path, infos=dict(source.infos), loader=load,
                            aliases=dict(source.aliases), metadata=dict(source.metadata), config=source.config,
                            weights_format=source.weights_format, files=list(source.files),
                            extra_files=list(source.extra_files), zero_copy=False, details=dict(source.details))
        options = WriteOptions(progress=progress, weights_format=dest.weights_format)
        verification = quality = None
        with atomic_output(dst_path, folder=dest.folder, force=force) as tmp:
            with status.phase(f"pruning into {dst_path.name}"):
                files = dest.format.write(view, tmp, folder=dest.folder, options=options)
            if verify:
                with status.phase("checking the written weights"), dest.format.open(tmp) as written:
                    verification = compare_weights(view, written, profile="exact")
                    tensors = [_measure(written, n, sparsity=sparsity, pattern=pattern, in_axis=axes[n])
                               for n in chosen]
                _add_pattern_checks(verification, tensors, pattern=pattern, sparsity=sparsity)
                verification.reference, verification.candidate = str(src_path), str(dst_path)
                failed = functools.partial(PruneReport, source=str(src_path), destination=str(dst_path),
                                           source_format=fmt.name, destination_format=dest.format.name,
                                           pattern=pattern, sparsity=sparsity, tensors=tensors, files=[],
                                           bytes_written=None, parameters=source.num_parameters, skipped=skipped,
                                           verification=verification, thresholds=thresholds, notes=notes,
                                           seconds=None)
                if not verification.passed:
                    raise NotEquivalent(f"the written output does not hold the pruned weights: "
                                        f"{verification.summary()}; nothing was written", report=verification,
                                        path=dst_path, result=failed())
                if fmt.name == "hf":
                    with status.phase("checking the pruned model's outputs"):
                        quality = _quality(src_path, tmp, checks=checks, thresholds=thresholds, provider="cpu")
                    quality.reference, quality.candidate = str(src_path), str(dst_path)
                    rename_paths(quality, {tmp: dst_path})
                    if not quality.passed:
                        raise NotEquivalent(f"the pruned model fails the quality check: {quality.summary()}; "
                                            "nothing was written", report=quality, path=dst_path,
                                            result=failed(quality=quality))
                else:
                    notes.append("quality not checked: a bare weights file cannot run; prune the hf folder "
                                 "(or an ONNX model) to compare outputs")
            else:
                tensors = [measured[n] for n in chosen if n in measured]
            size = sum(f.stat().st_size for f in files)
            rel = [str(dst_path / f.relative_to(tmp)) if dest.folder else str(dst_path) for f in files]
        return PruneReport(source=str(src_path), destination=str(dst_path), source_format=fmt.name,
                           destination_format=dest.format.name, pattern=pattern,
                           sparsity=sparsity, tensors=tensors, files=rel, bytes_written=size,
                           parameters=source.num_parameters, skipped=skipped, verification=verification,
                           quality=quality, notes=notes)


def _measure(src: TensorSource, name: str, *, sparsity: float, pattern: str, in_axis: int,
             node: str | None = None) -> PrunedTensor:
    t = src.tensor(name)
    return PrunedTensor(name, list(t.shape), int((t == 0).sum()), t.numel(), in_axis, node,
                        pattern_holds(t, sparsity=sparsity, pattern=pattern, in_axis=in_axis))


def _add_pattern_checks(report: VerifyReport, tensors: list[PrunedTensor], *, pattern: str, sparsity: float) -> None:
    for t in tensors:
        figures = {"shape": t.shape, "sparsity": round(t.sparsity, 6), "target": sparsity, "pattern": pattern}
        reason = "" if t.pattern_ok else f"does not meet {pattern} at sparsity {sparsity}"
        report.checks.append(Check(f"pattern {t.name}", t.pattern_ok, figures, reason))


# ---- quality -------------------------------------------------------------------------------------


def _quality(reference: Path, candidate: Path, *, checks: dict[str, Any], thresholds: dict[str, float | None],
             provider: str) -> VerifyReport:
    """Compare outputs and judge them by the pruning thresholds, not by a numeric tolerance profile."""
    from llmconv.verification.outputs import GATE_HINT, compare_outputs

    options: dict[str, Any] = {"provider": provider, "decode_steps": checks.get("decode_steps"),
                               "generate": checks.get("generate")}
    if checks["inputs"] is not None:
        options["inputs"] = Path(checks["inputs"])
    if checks["text"] is not None:
        options["text"] = Path(checks["text"])
        options["max_ppl_increase"] = thresholds["max_ppl_increase"]
    raw = compare_outputs(reference, candidate, profile="int4", **options)
    judged = judge_quality(raw, min_top1=thresholds["min_top1"], max_ppl_increase=thresholds["max_ppl_increase"])
    if not judged.passed:
        judged.notes.append(GATE_HINT)
    return judged


def judge_quality(report: VerifyReport, *, min_top1: float | None, max_ppl_increase: float | None) -> VerifyReport:
    """Re-judge an outputs report by quality thresholds (pruning changes values far past any tolerance).

    Every output must be finite; ``logits`` must agree on the top-1 token at least ``min_top1`` of the
    time; the perplexity check (with text) may rise by at most ``max_ppl_increase`` (relative).

    Returns:
        A new VerifyReport with profile ``quality``.
    """
    checks = []
    for c in report.checks:
        f = dict(c.figures)
        bad = int(f.get("nan") or 0) + int(f.get("inf") or 0)
        reason = f"{bad} NaN/inf values" if bad else ""
        ok = not bad
        if "relative_change" in f and max_ppl_increase is not None:
            change = f.get("relative_change")
            f["budget"] = max_ppl_increase
            ok = change is not None and not math.isnan(change) and change <= max_ppl_increase
            reason = "" if ok else f"perplexity rose by {change:.2%}, past the {max_ppl_increase:.2%} budget"
        elif c.name in ("logits", "decode.steps", "text.logits") and "top1_agreement" in f and min_top1 is not None:
            f["min_top1"] = min_top1
            top1 = f["top1_agreement"]
            if ok and top1 < min_top1:
                ok, reason = False, f"top-1 agreement {top1:.3f} is below {min_top1}"
        for key in ("atol", "rtol"):
            f.pop(key, None)
        if c.name == "generation":
            f["min_agreement"] = None  # reported: pruning is judged by top-1 and perplexity, not by generation
        checks.append(Check(c.name, ok, f, reason))
    extra = dict(report.extra)
    extra["thresholds"] = {k: v for k, v in (("min_top1", min_top1), ("max_ppl_increase", max_ppl_increase))
                           if v is not None}
    extra["thresholds"]["finite"] = True
    return VerifyReport(mode=report.mode, profile="quality", reference=report.reference, candidate=report.candidate,
                        checks=checks, inputs=report.inputs, extra=extra, notes=list(report.notes))


# ---- ONNX ----------------------------------------------------------------------------------------


def _shown(graph: Path, name: str, several: bool) -> str:
    """A tensor's name in reports: prefixed with its graph file when the model has several graphs."""
    return f"{graph.name}:{name}" if several else name


def _prune_onnx(src_path: Path, dst_path: Path, *, sparsity: float, pattern: str, selection: dict[str, list[str]],
                checks: dict[str, Any], thresholds: dict[str, float | None], provider: str, verify: bool,
                force: bool) -> PruneReport:
    import torch
    from onnx import numpy_helper

    from llmconv.formats.onnx import model_file
    from llmconv.transforms import graph as g
    from llmconv.transforms.common import (
        build_scratch,
        check_sidecar,
        copy_companions,
        install,
        onnx_destination,
        rename_paths,
    )

    g.require_onnx()
    from llmconv.formats.onnx import is_seq2seq_folder

    folder_out = onnx_destination(dst_path, what="the pruned model")
    seq2seq = is_seq2seq_folder(src_path)
    if seq2seq:
        from llmconv.verification.seq2seq import graph_files

        if not folder_out:
            raise UsageError("an encoder-decoder is several graphs (an encoder and a decoder), which need a folder",
                             path=dst_path, hint=f"give a destination without the {dst_path.suffix} extension")
        refs = graph_files(src_path)
    else:
        refs = [model_file(src_path)]
    if not folder_out:
        check_sidecar(dst_path, force=force)
    include, exclude = selection["include"], selection["exclude"]
    made: list[tuple[Path, Any, list[PrunedTensor], bool]] = []  # (source graph, pruned model, tensors, external)
    skipped: list[dict[str, str]] = []
    parameters = 0
    for ref_file in refs:
        with status.phase(f"reading {ref_file.name}"):
            model = g.load_model(ref_file)
        source_files = [ref_file, *g.external_data_files(g.load_model(ref_file, with_data=False), ref_file)]
        external = g.needs_external_data(model, source_files)
        g.name_nodes(model)
        from llmconv.formats.onnx import iter_graphs

        graphs = list(iter_graphs(model.graph))  # a merged decoder's layers sit in its If branches
        inits = {t.name: t for t in model.graph.initializer}
        users: dict[str, list[str]] = {}
        for node in (n for gr in graphs for n in gr.node):
            for i in node.input:
                users.setdefault(i, []).append(node.op_type)
        chosen: dict[str, g.LinearNode] = {}
        for ln in g.linear_nodes(model):
            named = _matches(include, ln.weight, ln.node) if include else not ln.is_output
            if not named or _matches(exclude, ln.weight, ln.node) or ln.weight in chosen or ln.weight not in inits:
                continue
            if any(op not in ("MatMul", "Gemm") for op in users.get(ln.weight, [])):
                skipped.append({"name": _shown(ref_file, ln.weight, seq2seq),
                                "reason": "also read by a non-linear node (a tied embedding?)"})
                continue
            chosen[ln.weight] = ln
        tensors = []
        with status.phase(f"pruning {ref_file.name}"):
            for i, (name, ln) in enumerate(chosen.items()):
                status.step(i + 1, len(chosen), "tensor")
                arr = numpy_helper.to_array(inits[name])
                out = prune_tensor(torch.from_numpy(arr.copy()), sparsity=sparsity, pattern=pattern,
                                   in_axis=ln.in_axis, name=name).numpy()
                inits[name].CopyFrom(numpy_helper.from_array(out, name))
                tensors.append(PrunedTensor(name, list(out.shape), int((out == 0).sum()), out.size, ln.in_axis,
                                            ln.node))
        parameters += sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in (1, 10, 11, 16))
        made.append((ref_file, model, tensors, external))
    if not any(m[2] for m in made):
        raise _nothing_selected(src_path)
    notes: list[str] = []
    with build_scratch(dst_path, src=src_path) as scratch:
        out_dir = scratch / "out"
        out_dir.mkdir()
        outs = []
        for ref_file, model, tensors, external in made:
            out_file = out_dir / (ref_file.name if seq2seq else "model.onnx" if folder_out else dst_path.name)
            with status.phase(f"writing the pruned {ref_file.name}"):
                g.save_model(model, out_file, external_data=external)
            outs.append((out_file, tensors))
        del made, model
        if folder_out:
            copy_companions(refs[0].parent, out_dir, notes=notes)
        verification = quality = None
        all_tensors: list[PrunedTensor] = []
        if verify:
            # A check that fails keeps the output inside a keep_failed block.
            keep_candidate(out_dir if folder_out else outs[0][0], dst_path, folder=folder_out)
            from llmconv.formats.onnx import open_model

            verification = VerifyReport(mode="weights", profile="exact", reference=str(src_path),
                                        candidate=str(dst_path))
            for out_file, tensors in outs:
                with open_model(out_file) as written:
                    measured = [_measure(written, t.name, sparsity=sparsity, pattern=pattern, in_axis=t.in_axis,
                                         node=t.node) for t in tensors]
                for before, after in zip(tensors, measured, strict=True):
                    after.name = _shown(out_file, after.name, seq2seq)
                    same = before.zeros == after.zeros
                    verification.checks.append(Check(after.name, same, {"shape": after.shape, "zeros": after.zeros},
                                                     "" if same else f"{after.zeros} zeros written, {before.zeros} "
                                                                     "made"))
                all_tensors += measured
            _add_pattern_checks(verification, all_tensors, pattern=pattern, sparsity=sparsity)
            failed = functools.partial(PruneReport, source=str(src_path), destination=str(dst_path),
                                       source_format="onnx", destination_format="onnx", pattern=pattern,
                                       sparsity=sparsity, tensors=all_tensors, files=[], bytes_written=None,
                                       parameters=parameters, skipped=skipped, verification=verification,
                                       thresholds=thresholds, notes=notes, seconds=None)
            if not verification.passed:
                raise NotEquivalent(f"the written model does not hold the pruned weights: {verification.summary()}; "
                                    "nothing was written", report=verification, path=dst_path, result=failed())
            reference, candidate = (src_path, out_dir) if seq2seq else (refs[0], outs[0][0])
            with status.phase("checking the pruned model's outputs"):
                quality = _quality(reference, candidate, checks=checks, thresholds=thresholds, provider=provider)
            quality.reference, quality.candidate = str(src_path), str(dst_path)
            rename_paths(quality, {outs[0][0]: dst_path / outs[0][0].name if folder_out else dst_path,
                                   out_dir: dst_path if folder_out else dst_path.parent})
            if not quality.passed:
                raise NotEquivalent(f"the pruned model fails the quality check: {quality.summary()}; nothing was "
                                    "written", report=quality, path=dst_path, result=failed(quality=quality))
        else:
            for out_file, tensors in outs:
                g.check_loads(out_file)
                for t in tensors:
                    t.name = _shown(out_file, t.name, seq2seq)
                all_tensors += tensors
        tensors = all_tensors
        size = sum(p.stat().st_size for p in out_dir.iterdir() if p.name.endswith((".onnx", "_data", ".data")))
        written = install(out_dir, dst_path, folder=folder_out, force=force, notes=notes)
    return PruneReport(source=str(src_path), destination=str(dst_path), source_format="onnx",
                       destination_format="onnx", pattern=pattern,
                       sparsity=sparsity, tensors=tensors, files=[str(p) for p in written], bytes_written=size,
                       parameters=parameters, skipped=skipped, verification=verification, quality=quality,
                       notes=notes)
