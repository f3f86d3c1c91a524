"""The exporters we drive: optimum-onnx's ``main_export`` in-process, and ``torch.onnx`` as the fallback.

We do not build graphs ourselves. optimum knows, per architecture, the inputs, the dynamic axes,
the past key/values layout and the patches that make transformers' code traceable; for a model
type it does not know, ``torch.onnx.export`` (TorchScript) runs on the model wrapped to take
``input_ids`` and ``attention_mask``, with optimum's vmap-free mask functions registered for the
duration, without past key/values.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmconv import progress
from llmconv.errors import ConversionError, MissingDependency, Unsupported, UsageError
from llmconv.export._quiet import quiet
from llmconv.export.tasks import (
    TASK_CLASSES,
    base_task,
    check_task,
    refuse_model_code,
    remote_code_refused,
    task_from_config,
)

MIN_OPSET = 7
_INSTALL = "pip install 'llmconv[onnx]' (or: pip install optimum-onnx onnx onnxruntime)"


@dataclass
class ExportPlan:
    """What will be exported and by which exporter."""

    model_type: str
    task: str
    exporter: str  # "optimum" or "torch.onnx"
    opset: int


def _optimum() -> Any:
    try:
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
        from optimum.exporters.tasks import TasksManager
    except ImportError as e:
        raise MissingDependency("optimum-onnx is not installed; ONNX export needs it", hint=_INSTALL) from e
    return TasksManager


def max_opset() -> int:
    """The highest opset the TorchScript exporter (which optimum uses) writes."""
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))


def plan_export(config: dict[str, Any], *, task: str | None, opset: int | None, path: Path) -> ExportPlan:
    """Decide task, exporter and opset for a model folder's config.

    Args:
        config: the parsed config.json.
        task: the task asked for, or None/``auto`` to infer it (``-with-past`` when optimum offers it).
        opset: the opset asked for, or None for the exporter's default.
        path: the model folder, for messages.
    Returns:
        An ExportPlan.
    Example:
        >>> plan_export({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, task=None, opset=None,
        ...             path=Path("gpt2")).task
        'text-generation-with-past'
    """
    tm = _optimum()
    model_type = str(config.get("model_type") or "")
    if not model_type:
        raise UsageError("config.json has no model_type; an ONNX graph needs the architecture", path=path)
    auto = task in (None, "", "auto")
    wanted = task_from_config(config) if auto else tm.map_from_synonym(task)
    check_task(wanted)
    refuse_model_code(config, path=path, auto_class=TASK_CLASSES[base_task(wanted)][0])
    hi = max_opset()
    if opset is not None and not MIN_OPSET <= opset <= hi:
        raise UsageError(f"--opset {opset} is outside what the exporter writes ({MIN_OPSET}..{hi})")
    if model_type in tm._SUPPORTED_MODEL_TYPE or model_type.replace("_", "-") in tm._SUPPORTED_MODEL_TYPE:
        offered = list(tm.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers"))
        if auto and f"{wanted}-with-past" in offered:
            wanted = f"{wanted}-with-past"
        if wanted not in offered:
            ours = [t for t in offered if base_task(t) in TASK_CLASSES]
            raise Unsupported(f"optimum exports {model_type} for {', '.join(ours)}; not for task {wanted!r}",
                              path=path, hint="pass one of those with --task")
        constructor = tm.get_exporter_config_constructor(exporter="onnx", model_type=model_type, task=wanted,
                                                         library_name="transformers")
        default = int(getattr(getattr(constructor, "func", constructor), "DEFAULT_ONNX_OPSET", 18))
        return ExportPlan(model_type, wanted, "optimum", opset or min(default, hi))
    if wanted.endswith("-with-past"):
        raise Unsupported(f"optimum does not know {model_type}, and the torch.onnx fallback exports it without "
                          "past key/values", path=path, hint=f"use --task {base_task(wanted)}")
    return ExportPlan(model_type, wanted, "torch.onnx", opset or min(18, hi))


def run_export(plan: ExportPlan, folder: Path, out_dir: Path) -> None:
    """Export ``folder`` into ``out_dir`` as ``model.onnx`` (+ config and tokenizer files)."""
    with progress.phase(f"exporting to ONNX ({plan.exporter})"), quiet():
        if plan.exporter == "optimum":
            _export_optimum(plan, folder, out_dir)
        else:
            _export_torch(plan, folder, out_dir)
    _carry_files(folder, out_dir)


def _export_optimum(plan: ExportPlan, folder: Path, out_dir: Path) -> None:
    from optimum.exporters.onnx import main_export
    from torch.onnx.errors import OnnxExporterError

    try:
        # Validation is ours (verify in outputs mode): optimum's only warns when outputs differ.
        with remote_code_refused(folder), _same_graph_with_or_without_accelerate():
            main_export(str(folder), output=str(out_dir), task=plan.task, opset=plan.opset, device="cpu",
                        dtype="fp32", framework="pt", library_name="transformers", local_files_only=True,
                        do_validation=False, trust_remote_code=False)
    except OnnxExporterError as e:
        raise ConversionError(f"torch.onnx cannot export {plan.model_type} at opset {plan.opset}: "
                              f"{_gist(e)}", path=folder, hint="try another --opset") from e


@contextlib.contextmanager
def _same_graph_with_or_without_accelerate() -> Iterator[None]:
    """Export the graph optimum makes without accelerate, whether it is installed or not.

    With accelerate importable (PEFT depends on it), optimum's post-processing rewrites a tied output head (GPT-2's
    ``lm_head`` = ``wte``) to share the embedding's initializer; without it, the head stays an initializer of its
    own. The name record, the int8/int4 rules and pruning are written and tested for the latter; an export must
    not change with an unrelated package installed.
    """
    from optimum.exporters.onnx import base

    saved = base.is_accelerate_available
    base.is_accelerate_available = lambda *a, **k: False
    try:
        yield
    finally:
        base.is_accelerate_available = saved


def _gist(e: BaseException) -> str:
    """The first line of an exporter error that says something (torch's may open with a blank line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class _Wrapped:
    """Builds the module the TorchScript exporter sees: positional (input_ids, attention_mask) in, one tensor out."""

    @staticmethod
    def make(model: Any, output: str, causal: bool) -> Any:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                kwargs = {"use_cache": False} if causal else {}
                out = self.inner(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
                return out[output]

        # eval() on the wrapper too: the exporter traces the wrapper's mode, and dropout must be off.
        return Wrapped(model).eval()


@contextlib.contextmanager
def _traceable_masks() -> Iterator[None]:
    """Register optimum's vmap-free attention-mask functions (TorchScript cannot trace vmap)."""
    import transformers.masking_utils as mu
    from optimum.exporters.onnx.model_patcher import (
        eager_mask_without_vmap,
        find_packed_sequence_indices_patched,
        sdpa_mask_without_vmap,
    )

    registry = mu.ALL_MASK_ATTENTION_FUNCTIONS
    saved = {k: registry[k] for k in ("sdpa", "eager") if k in registry}
    saved_find = getattr(mu, "find_packed_sequence_indices", None)
    registry.register("sdpa", sdpa_mask_without_vmap)
    registry.register("eager", eager_mask_without_vmap)
    if saved_find is not None:
        mu.find_packed_sequence_indices = find_packed_sequence_indices_patched
    try:
        yield
    finally:
        for k, fn in saved.items():
            registry.register(k, fn)
        if saved_find is not None:
            mu.find_packed_sequence_indices = saved_find


def _export_torch(plan: ExportPlan, folder: Path, out_dir: Path) -> None:
    import torch
    import transformers
    from torch.onnx.errors import OnnxExporterError

    cls_name, output = TASK_CLASSES[base_task(plan.task)]
    with remote_code_refused(folder):
        model = getattr(transformers, cls_name).from_pretrained(str(folder), dtype=torch.float32,
                                                                local_files_only=True, trust_remote_code=False)
    model.eval()
    wrapped = _Wrapped.make(model, output, base_task(plan.task) == "text-generation")
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row, so the mask path is traced rather than skipped
    out_dir.mkdir(parents=True, exist_ok=True)
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "sequence_length"},
            output: {0: "batch_size", 1: "sequence_length"} if base_task(plan.task) != "text-classification"
            else {0: "batch_size"}}
    try:
        with _traceable_masks(), torch.no_grad():
            torch.onnx.export(wrapped, (ids, mask), str(out_dir / "model.onnx"),
                              input_names=["input_ids", "attention_mask"], output_names=[output],
                              dynamic_axes=axes, opset_version=plan.opset, do_constant_folding=True, dynamo=False)
    except OnnxExporterError as e:
        raise ConversionError(f"torch.onnx cannot export {plan.model_type} at opset {plan.opset}: "
                              f"{_gist(e)}", path=folder, hint="try another --opset") from e
    model.config.save_pretrained(out_dir)
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None and (folder / "generation_config.json").is_file():
        gen_config.save_pretrained(out_dir)


# Files an ONNX folder needs beside the graph: config, generation config, tokenizer and processor files.
CARRIED_PREFIXES = ("config.json", "generation_config.json", "tokenizer", "special_tokens_map.json", "vocab.",
                     "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece", "chat_template",
                     "preprocessor_config.json")


def _carry_files(folder: Path, out_dir: Path) -> None:
    """Copy the config and tokenizer files the exporter did not write itself (never weights)."""
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.startswith(CARRIED_PREFIXES) and not (out_dir / p.name).exists():
            shutil.copyfile(p, out_dir / p.name)
