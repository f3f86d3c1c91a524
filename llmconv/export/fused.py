"""Fused generation graphs: onnxruntime-genai's model builder, called as a library.

The builder writes a causal LM as the graph onnxruntime's generation kernels want: GroupQueryAttention with the
rotary embedding inside, SkipSimplifiedLayerNormalization for the norms and residual adds, Q/K/V projections
packed into one MatMul (about 100 nodes for a Llama, where the exporter's graph has about 2000), with standard input
names (``input_ids``, ``attention_mask``, ``past_key_values.N.key``) and a ``genai_config.json`` for
onnxruntime-genai's own runtime. llmconv builds the float graph with it and quantizes that with the same tools
and rules as any other graph; verification runs it against the PyTorch model.

The builder is an optional dependency (``pip install 'llmconv[fused]'``): onnxruntime-genai 0.15.2 is the last
release whose builder imports with transformers < 4.58 (0.16 and later import transformers 5 classes).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmconv import progress
from llmconv.errors import ConversionError

__all__ = ["ARCHITECTURES", "architecture", "build", "builder_version", "unfused_reason", "write_genai_config"]

# The builder's text-only causal LMs whose float32 graph llmconv checked against PyTorch within the fp32 profile
# (prefill, cached decode, generation) on a seeded model of each.
ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Phi3ForCausalLM", "GemmaForCausalLM", "GraniteForCausalLM"})
# Left out after that check: the builder's OLMo graph is not OLMo (fp32 logits cosine 0.988 against PyTorch's,
# greedy agreement 0.625, on the seeded tiny OLMo); Gemma 2/3 (sliding windows) and Phi were not checked beyond
# short prompts, or do not run.


@functools.cache
def builder_version() -> str | None:
    """The installed onnxruntime-genai's version, or None when its model builder cannot be imported (not
    installed, or a release that imports classes of another transformers)."""
    try:
        with _quiet_builder():
            import onnxruntime_genai
            from onnxruntime_genai.models import builder  # noqa: F401
    except ImportError:
        return None
    return str(getattr(onnxruntime_genai, "__version__", "?"))


def architecture(config: dict[str, Any] | None) -> str | None:
    """The model class config.json names (``architectures[0]``), or None."""
    archs = (config or {}).get("architectures") or []
    return archs[0] if archs and isinstance(archs[0], str) else None


def unfused_reason(config: dict[str, Any] | None) -> str | None:
    """Why a model with this config.json gets the exporter's plain graph instead of a fused one, or None."""
    arch = architecture(config) or (config or {}).get("model_type", "this model")
    if arch not in ARCHITECTURES:
        return (f"{arch} is not among the architectures llmconv fuses through onnxruntime-genai's model builder "
                f"({', '.join(sorted(a.removesuffix('ForCausalLM') for a in ARCHITECTURES))})")
    rope = (config or {}).get("rope_scaling") or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) not in (None, "default", "linear"):
        return f"{arch} with rope_scaling {rope.get('rope_type', rope.get('type'))!r} is not fused (not verified)"
    if builder_version() is None:
        return ("onnxruntime-genai's model builder is not installed (pip install 'llmconv[fused]', which is "
                "onnxruntime-genai==0.15.2)")
    return None


def build(folder: Path, out_dir: Path, *, target: str, precision: str = "fp32", source: Path | None = None,
          filename: str = "model.onnx") -> Path:
    """Write the fused graph of the hf model in ``folder`` (a ``transformers_view``: data files only) to
    ``out_dir/filename`` (+ ``filename.data`` and ``genai_config.json``).

    Args:
        folder: the model folder the builder reads (loaded with ``trust_remote_code=False``).
        out_dir: where the graph goes (created).
        target: ``cpu`` or ``gpu`` (the builder's ``cuda``: attention in fp16, as CUDA's kernels take it).
        precision: the builder's ``fp32``, ``fp16`` or ``int4``.
        source: the folder messages name (the user's, of which ``folder`` is a view).
        filename: the graph's file name.
    Returns:
        The graph's path.
    Raises:
        ConversionError: the builder failed.
    """
    with _quiet_builder():
        from onnxruntime_genai.models import builder

    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir.parent / f".{out_dir.name}-builder-cache"
    provider = "cuda" if target == "gpu" else "cpu"
    options: dict[str, Any] = {"filename": filename, "hf_remote": "false"}
    with progress.phase(f"building the fused graph (onnxruntime-genai {builder_version()} model builder)"):
        try:
            with _quiet_builder(), _no_processing_files():
                builder.check_extra_options(None, str(folder), str(out_dir), precision, provider, str(cache), options)
                builder.create_model(None, str(folder), str(out_dir), precision, provider, str(cache), **options)
        except Exception as e:  # noqa: BLE001 - the builder raises bare Exceptions; say which step failed
            raise ConversionError(f"onnxruntime-genai's model builder failed: {type(e).__name__}: {e}",
                                  path=source or folder, hint="rerun with --no-optimize for the exporter's plain "
                                                              "graph") from e
    model = out_dir / filename
    if not model.is_file():
        raise ConversionError(f"onnxruntime-genai's model builder wrote no {filename}", path=source or folder,
                              hint="rerun with --no-optimize for the exporter's plain graph")
    _name_head_size(model, out_dir / "genai_config.json")
    from llmconv.export.onnx_post import write_name_record
    from llmconv.formats.onnx import NameRecord

    write_name_record(model, NameRecord(unavailable=UNRECORDED))
    return model


# Why a fused graph has no name record (what `convert GRAPH --to hf` says).
UNRECORDED = ("it was built by onnxruntime-genai's model builder, whose packed Q/K/V projections hold no single "
              "checkpoint tensor; convert the model's hf folder instead")


def _name_head_size(model_path: Path, genai_config: Path) -> None:
    """Write the head size into the cache inputs' and outputs' shapes, where the builder leaves a symbol
    (``kv_cache_dim``): a graph alone (no config.json beside it) then tells its cache's shape."""
    import onnx

    head_size = json.loads(genai_config.read_text(encoding="utf-8"))["model"]["decoder"]["head_size"]
    model = onnx.load(str(model_path), load_external_data=False)
    changed = False
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            dims = value.type.tensor_type.shape.dim
            if len(dims) == 4 and not dims[3].HasField("dim_value"):
                dims[3].dim_value = int(head_size)
                changed = True
    if changed:
        onnx.save(model, str(model_path))


def write_genai_config(config_file: Path, *, target: str, source: Path | None = None) -> None:
    """Set ``genai_config.json``'s provider for ``target`` (the graph may have been built for another).

    Raises:
        InputError: the file has no ``model.decoder`` object (``source`` names the file it was copied from).
    """
    from llmconv.checkpoint import read_json
    from llmconv.errors import InputError

    data = read_json(config_file, what="genai_config.json")
    decoder = data.get("model", {}).get("decoder") if isinstance(data, dict) and isinstance(data.get("model"),
                                                                                             dict) else None
    if not isinstance(decoder, dict):
        raise InputError("genai_config.json has no model.decoder object", path=source or config_file,
                         hint="remove it, or write it again with onnxruntime-genai's model builder")
    session = decoder.setdefault("session_options", {})
    session["provider_options"] = [{"cuda": {"enable_cuda_graph": "0"}}] if target == "gpu" else []
    config_file.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _quiet_builder() -> Iterator[None]:
    """The builder prints its options and draws a progress bar per tensor saved: keep them off the terminal
    (llmconv's own status line says what is being built). tqdm reads TQDM_DISABLE only when it is imported, so the
    builder's bar is made disabled instead."""
    from llmconv.export._quiet import quiet
    from llmconv.transforms.graph import quiet_onnxruntime

    with quiet(), quiet_onnxruntime(), contextlib.redirect_stdout(io.StringIO()):
        base = _builder_base()
        bar = getattr(base, "tqdm", None)
        if bar is not None:
            base.tqdm = functools.partial(bar, disable=True)
        try:
            yield
        finally:
            if bar is not None:
                base.tqdm = bar


@contextlib.contextmanager
def _no_processing_files() -> Iterator[None]:
    """The builder ends by saving the folder's tokenizer through AutoTokenizer, which fails on a folder without
    one (after the graph is written). llmconv copies the source's tokenizer and config files itself, as they
    are: that step is skipped."""
    model_class = getattr(_builder_base(), "Model", None)
    saved = getattr(model_class, "save_processing", None)
    if saved is not None:
        model_class.save_processing = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        if saved is not None:
            model_class.save_processing = saved


def _builder_base() -> Any:
    """The module whose ``tqdm`` the builder's save calls: onnxruntime_genai.models puts its own folder on sys.path
    and imports ``builders.base`` under that top-level name (a second copy beside the package's own)."""
    try:
        from onnxruntime_genai.models import builder  # noqa: F401
    except ImportError:  # not installed, or does not import: builder_version() says so
        return None
    return sys.modules.get("builders.base") or sys.modules.get("onnxruntime_genai.models.builders.base")
