"""Runners for outputs mode: PyTorch for Hugging Face folders, onnxruntime for ONNX graphs.

:func:`describe` reads what a model takes and gives from its files alone (config.json, the ONNX
graph's inputs and outputs, weight dtypes), without loading weights, so that inputs can be planned
before either model runs. :func:`open_runner` then loads one model at a time: the verifier runs the
reference on every input, releases it, and only then loads the candidate, so peak memory is one
model plus outputs.

Both runners name outputs the way optimum's ONNX export does (``logits``, ``last_hidden_state``,
``present.{i}.key``/``.value``), so any pair (hf vs ONNX, ONNX vs ONNX, hf vs hf) compares by name.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmconv.errors import GraphRunError, InputError, MissingDependency, Unsupported, UsageError
from llmconv.export.tasks import (
    TASK_CLASSES,
    base_task,
    code_note,
    is_causal,
    refuse_model_code,
    remote_code_refused,
    task_from_config,
    transformers_view,
)
from llmconv.verification.inputs import KNOWN_INPUTS, ImageSpec, PastSpec, image_spec, main_shape

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul",
             "ConvInteger", "QLinearConv", "DynamicQuantizeMatMul", "QAttention", "QGemm", "QLinearAdd",
             "QLinearMul", "MatMulIntegerToFloat", "QOrderedMatMul"}
_INT4_OPS = {"MatMulNBits", "GatherBlockQuantized", "MatMulBnb4"}
# Attention that takes each row's length (seqlens_k) instead of a mask: the first tokens of a row are its real ones,
# so a left-padded row attends to its padding. onnxruntime-genai runs such graphs on unpadded prompts.
_LENGTHS_ATTENTION = {"GroupQueryAttention", "SparseAttention", "PagedAttention"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")
_ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
              "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(bool)": np.bool_,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


@dataclass
class Signature:
    """What a model takes and gives, read from its files.

    Attributes:
        path: the path as given.
        kind: ``onnxruntime`` or ``torch``.
        model_path: the ``.onnx`` file, or the hf folder.
        task: the task it is for (``text-generation-with-past``, ``feature-extraction``, ...), or None.
        inputs: the non-past inputs it takes.
        required: inputs it cannot run without (every ONNX graph input).
        past: the past key/values it takes, if any.
        outputs: its output names (for hf folders, filled in once the task is settled).
        config: config.json, when there is one.
        vocab_size: size of the vocabulary, when known.
        max_positions: longest sequence it handles, when known.
        float_dtype: the dtype of most of its floating-point weight bytes.
        quantization: ``int8``, ``int4`` or None.
        tokenizer_dir: the folder with its tokenizer files, if any.
        pad_token_id: the id its config pads rows with, when it names one.
        image: for an image model (it takes ``pixel_values``), the images it takes.
        unpadded_only: the graph's attention op when it reads the attention mask as lengths and so cannot mask a
            left-padded row (GroupQueryAttention): such a graph decodes each prompt unpadded, one at a time.
    """

    path: Path
    kind: str
    model_path: Path
    task: str | None
    inputs: set[str] = field(default_factory=set)
    required: set[str] = field(default_factory=set)
    past: PastSpec | None = None
    outputs: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    vocab_size: int | None = None
    max_positions: int | None = None
    float_dtype: str | None = None
    quantization: str | None = None
    tokenizer_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    pad_token_id: int | None = None
    image: ImageSpec | None = None
    unpadded_only: str | None = None
    gguf_file: Path | None = None
    adapters: list[Any] | None = None  # LoRA adapters run unmerged on this model (llmconv.adapters.Adapter)
    adapter_runtime: str = "peft"  # who runs them: "peft" or "llmconv"
    patch: Any = None  # called with the loaded model (changes parameters in place); returns what it did, for the label


def _max_positions(config: dict[str, Any] | None) -> int | None:
    if not config:
        return None
    for k in _MAX_POSITION_KEYS:
        v = config.get(k)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _pad_token_id(config: dict[str, Any] | None) -> int | None:
    value = (config or {}).get("pad_token_id")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _tokenizer_dir(folder: Path) -> Path | None:
    return folder if any((folder / n).is_file() for n in _TOKENIZER_FILES) else None


def _num_layers(config: dict[str, Any]) -> int:
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(k), int):
            return int(config[k])
    raise UsageError("config.json names no layer count (num_hidden_layers)")


def describe(path: Path) -> Signature:
    """Read a model's signature from its files (no weights are loaded).

    Args:
        path: an hf folder, or an ONNX model (file, or folder holding one).
    Returns:
        A Signature.
    Raises:
        UsageError: the path holds only weights, which outputs mode cannot run.
    Example:
        >>> describe(Path("gpt2-onnx")).task
        'text-generation-with-past'
    """
    from llmconv.formats import registry

    path = Path(path)
    fmt = registry.detect(path)
    if fmt.name == "onnx":
        return _describe_onnx(path)
    if fmt.name == "hf":
        return _describe_hf(path)
    if fmt.name == "gguf":
        return _describe_gguf(path)
    raise UsageError(f"outputs mode needs a model it can run; this is a bare {fmt.name} weights file", path=path,
                     hint="give the model's Hugging Face folder (config.json + weights) or an ONNX model, "
                          "or compare weights with --mode weights")


def _describe_hf(path: Path) -> Signature:
    from llmconv.checkpoint import dtype_name
    from llmconv.formats.hf import FORMAT as HF

    with HF.open(path) as src:
        config = src.config or {}
        refuse_model_code(config, path=path)  # before anything is loaded, so that nothing of either side runs
        by_dtype: Counter[str] = Counter()
        for n, info in src.infos.items():
            if info.dtype.is_floating_point and n not in src.aliases:
                by_dtype[dtype_name(info.dtype)] += info.nbytes
    float_dtype = by_dtype.most_common(1)[0][0] if by_dtype else None
    if _main_input(config) == "pixel_values":
        return Signature(path=path, kind="torch", model_path=path, task=task_from_config(config),
                         inputs={"pixel_values"}, config=config, float_dtype=float_dtype, notes=code_note(path),
                         image=image_spec(config, path))
    # No position_ids: a PyTorch model computes its own when it is used, by its own rule (RoBERTa counts
    # from pad_token_id + 1, skipping padding). They are fed only when a graph takes them, or the user gave them.
    wants = {"input_ids", "attention_mask"}
    if config.get("type_vocab_size"):
        wants.add("token_type_ids")
    return Signature(path=path, kind="torch", model_path=path, task=task_from_config(config), inputs=wants,
                     config=config, vocab_size=config.get("vocab_size"), max_positions=_max_positions(config),
                     float_dtype=float_dtype, tokenizer_dir=_tokenizer_dir(path), notes=code_note(path),
                     pad_token_id=_pad_token_id(config))


# The profile a GGUF file is judged by, from its main (most bytes) tensor type.
_GGUF_PROFILE = {"F32": (None, "float32"), "F16": (None, "float16"), "BF16": (None, "bfloat16"),
                 "Q8_0": ("int8", "float32"), "Q4_0": ("int4", "float32"), "Q4_1": ("int4", "float32"),
                 "Q5_0": ("int4", "float32"), "Q5_1": ("int4", "float32")}


def _describe_gguf(path: Path) -> Signature:
    """A GGUF file, run in PyTorch through transformers' own GGUF loader (which dequantizes it independently of
    llmconv's reader)."""
    from llmconv.formats import gguf

    with gguf.open_gguf(path, folder_files=False) as src:
        config = dict(src.config) if src.config is not None else None
        info = src.details["gguf"]
        gguf.refuse_unreadable(src)
        if config is not None:
            gguf.refuse_unmapped(src, what="running it through transformers")
    if config is None:
        raise Unsupported(f"outputs mode runs GGUF files of the architectures transformers' GGUF loader and llmconv "
                          f"map back ({', '.join(sorted(gguf.gguf_arch.READ_BACK))}); this one is "
                          f"{info['architecture'] or 'unnamed'}", path=path,
                          hint="compare its weights with --mode weights")
    quantization, float_dtype = _GGUF_PROFILE.get(info["main_type"], (None, "float32"))
    return Signature(path=path, kind="torch", model_path=path, task=task_from_config(config),
                     inputs={"input_ids", "attention_mask"}, config=config, vocab_size=config.get("vocab_size"),
                     max_positions=_max_positions(config), float_dtype=float_dtype, quantization=quantization,
                     notes=["the GGUF file ran through transformers' GGUF loader (dequantized to float32 by "
                            "transformers, not llmconv)"], pad_token_id=_pad_token_id(config), gguf_file=path)


def _main_input(config: dict[str, Any]) -> str:
    """The input a model folder's architecture is driven by: its transformers class's ``main_input_name``
    (``pixel_values`` for ViT, ResNet, ConvNeXt, ...). Only a config that describes images (``num_channels``,
    ``image_size``) has its class looked up; without the class, such a config with no vocabulary is an image
    model."""
    if "num_channels" not in config and "image_size" not in config:
        return "input_ids"
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    name = None
    if arch is not None and arch.isidentifier():
        try:
            import transformers

            name = getattr(getattr(transformers, arch, None), "main_input_name", None)
        except ImportError:
            name = None
    if isinstance(name, str):
        return name
    return "pixel_values" if not config.get("vocab_size") else "input_ids"


# Signatures of graphs just written, keyed by (resolved path, size, mtime): the exporter has the proto
# in hand already, and parsing a large model again costs about a second per GB.
_KNOWN: dict[tuple[str, int, int], Signature] = {}


def _key(mfile: Path) -> tuple[str, int, int]:
    st = mfile.stat()
    return str(mfile.resolve()), st.st_size, st.st_mtime_ns


def remember_graph(mfile: Path, model: Any) -> None:
    """Describe a graph from its parsed proto, so that verifying it right after does not parse it again.

    Args:
        mfile: the ``.onnx`` file, exactly as written (the entry is dropped if it changes).
        model: its ModelProto (weights may be left out: only the structure is read).
    """
    _KNOWN.clear()
    _KNOWN[_key(mfile)] = _signature_from_proto(mfile, mfile, model)


def _describe_onnx(path: Path) -> Signature:
    from llmconv.formats.onnx import load_graph, model_file

    mfile = model_file(path)
    known = _KNOWN.get(_key(mfile))
    if known is not None:
        return Signature(**{**known.__dict__, "path": path})
    view = load_graph(mfile)  # structure only: inline weights stay in the file
    try:
        return _signature_from_proto(path, mfile, view.model)
    finally:
        view.close()


def _signature_from_proto(path: Path, mfile: Path, model: Any) -> Signature:
    from llmconv.checkpoint import read_json
    from llmconv.formats.onnx import check_external_references, iter_graphs, onnx_type_name

    check_external_references(model, mfile)  # onnxruntime would follow them wherever they lead
    init_names: set[str] = set()
    by_dtype: Counter[str] = Counter()
    quant: str | None = None
    unpadded_only: str | None = None
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            init_names.add(t.name)
            name = onnx_type_name(t.data_type)
            if name in ("int4", "uint4"):
                quant = "int4"
            if name in ("float32", "float16", "bfloat16", "float64"):
                n = 1
                for d in t.dims:
                    n *= int(d)
                by_dtype[name] += n * {"float64": 8, "float32": 4}.get(name, 2)
        for node in g.node:
            if node.op_type in _LENGTHS_ATTENTION:
                unpadded_only = node.op_type
            if node.op_type in _INT4_OPS:
                bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
                quant = "int4" if bits <= 4 else (quant or "int8")
            elif node.op_type in _INT8_OPS and quant is None:
                quant = "int8"
    graph_inputs = [v for v in model.graph.input if v.name not in init_names]
    in_types = {v.name: v.type.tensor_type for v in graph_inputs}
    pixel_dims = ([d.dim_value if d.HasField("dim_value") else None for d in in_types["pixel_values"].shape.dim]
                  if "pixel_values" in in_types else None)
    outputs = [v.name for v in model.graph.output]
    out_types = {v.name: v.type.tensor_type for v in model.graph.output}
    del model

    config = None
    if (mfile.parent / "config.json").is_file():
        parsed = read_json(mfile.parent / "config.json", what="config.json")
        config = parsed if isinstance(parsed, dict) else None

    past_layers: dict[int, dict[str, str]] = {}
    plain: set[str] = set()
    for name in in_types:
        m = _PAST_RE.match(name)
        if m:
            past_layers.setdefault(int(m.group(1)), {})[m.group(2)] = name
        else:
            plain.add(name)
    past = None
    if past_layers:
        first = in_types[next(iter(past_layers[min(past_layers)].values()))]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in first.shape.dim]
        heads = dims[1] if len(dims) == 4 and dims[1] else None
        head_dim = dims[3] if len(dims) == 4 and dims[3] else None
        if config and heads is None:
            heads = config.get("num_key_value_heads") or config.get("num_attention_heads") or config.get("n_head")
        if config and head_dim is None and heads:
            hidden = config.get("hidden_size") or config.get("n_embd")
            n_heads = config.get("num_attention_heads") or config.get("n_head")
            head_dim = config.get("head_dim") or (hidden // n_heads if hidden and n_heads else None)
        if (not heads or not head_dim) and config is None:
            heads, head_dim = _genai_cache_dims(mfile.parent, heads, head_dim)
        if not heads or not head_dim:
            raise UsageError("the graph takes past key/values of unknown shape and there is no config.json "
                             "beside it to tell", path=mfile, hint="copy the model's config.json beside the .onnx file")
        names = []
        for i in sorted(past_layers):
            kv = past_layers[i]
            if set(kv) != {"key", "value"}:
                raise UsageError(f"past key/values of layer {i} are incomplete", path=mfile)
            names.append((kv["key"], kv["value"]))
        dtype = onnx_type_name(first.elem_type)
        past = PastSpec(names=names, num_heads=int(heads), head_dim=int(head_dim), dtype=dtype)

    vocab = config.get("vocab_size") if config else None
    if not vocab and "logits" in out_types:
        last = out_types["logits"].shape.dim
        if last and last[-1].HasField("dim_value"):
            vocab = int(last[-1].dim_value)
    task = _onnx_task(outputs, out_types, config, has_past=past is not None, inputs=plain)
    image = image_spec(config, mfile.parent, graph_dims=pixel_dims) if pixel_dims is not None else None
    return Signature(path=path, kind="onnxruntime", model_path=mfile, task=task, inputs=plain,
                     required=set(in_types), past=past, outputs=outputs, config=config,
                     vocab_size=vocab if image is None else None, max_positions=_max_positions(config),
                     float_dtype=by_dtype.most_common(1)[0][0] if by_dtype else None, quantization=quant,
                     tokenizer_dir=_tokenizer_dir(mfile.parent), pad_token_id=_pad_token_id(config), image=image,
                     unpadded_only=unpadded_only)


def _genai_cache_dims(folder: Path, heads: int | None, head_dim: int | None) -> tuple[int | None, int | None]:
    """The cache's heads and head size from an onnxruntime-genai folder's genai_config.json (what its model
    builder writes beside a graph instead of config.json), for what the graph's shapes leave open."""
    from llmconv.checkpoint import read_json

    path = folder / "genai_config.json"
    if not path.is_file():
        return heads, head_dim
    parsed = read_json(path, what="genai_config.json")
    decoder = parsed.get("model", {}).get("decoder", {}) if isinstance(parsed, dict) else {}
    if not isinstance(decoder, dict):
        return heads, head_dim
    found_heads, found_size = decoder.get("num_key_value_heads"), decoder.get("head_size")
    return (heads or (found_heads if isinstance(found_heads, int) else None),
            head_dim or (found_size if isinstance(found_size, int) else None))


def _onnx_task(outputs: list[str], out_types: dict[str, Any], config: dict[str, Any] | None, *,
               has_past: bool, inputs: set[str] | None = None) -> str | None:
    """The task an ONNX graph was exported for, from its inputs and outputs (and config.json when it is
    there): a graph of images gives class scores (image-classification) or features."""
    if "last_hidden_state" in outputs:
        base = "feature-extraction"
    elif "logits" in outputs:
        rank = len(out_types["logits"].shape.dim)
        from_config = task_from_config(config) if config else None
        if "pixel_values" in (inputs or ()) and rank == 2:
            base = "image-classification"
        elif rank == 2:
            base = "text-classification"
        elif from_config in ("text-generation", "fill-mask", "token-classification"):
            base = from_config
        else:
            base = "text-generation"
    else:
        return None
    return f"{base}-with-past" if has_past else base


def settle_task(ref: Signature, cand: Signature) -> tuple[str, str]:
    """The task each side runs: an ONNX side's own; an hf side follows the ONNX side, or the reference.

    Returns:
        (reference task, candidate task).
    """
    ort_tasks = [s.task for s in (ref, cand) if s.kind == "onnxruntime" and s.task]

    def pick(sig: Signature) -> str:
        if sig.kind == "onnxruntime":
            return sig.task or ""  # a graph of no known task: its shared outputs are compared as they are
        task = ort_tasks[0] if ort_tasks else (ref.task if ref.kind == "torch" else sig.task)
        if not task:
            raise UsageError("cannot tell which transformers class to run against this graph: it has neither "
                             "'logits' nor 'last_hidden_state' among its outputs", path=sig.path)
        if ort_tasks or not is_causal(task):
            return task
        # hf vs hf: causal models compare their caches too.
        return f"{base_task(task)}-with-past"

    return pick(ref), pick(cand)


def _ort_threads() -> int:
    raw = os.environ.get("LLMCONV_ORT_THREADS", "")
    try:
        return max(0, int(raw)) if raw else 0
    except ValueError:
        raise UsageError(f"LLMCONV_ORT_THREADS={raw!r} is not a number") from None


class OrtRunner:
    """An onnxruntime session on one graph. ``LLMCONV_ORT_THREADS`` caps its intra-op threads.

    ``provider`` is the execution provider that actually runs the graph, read back from the session:
    onnxruntime falls back to the CPU, silently, when it cannot start the one asked for.
    """

    kind = "onnxruntime"

    def __init__(self, sig: Signature, *, provider: str, task: str | None = None) -> None:
        self.sig = sig
        self.session = ort_session(sig.model_path, path=sig.model_path, provider=provider)
        self.provider = self.session.get_providers()[0]
        self.label = f"onnxruntime ({self.provider}, {task or sig.task or 'unknown task'})"
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, Any], names: list[str]) -> dict[str, np.ndarray]:
        return run_session(self.session, feed, names, path=self.sig.model_path)

    def close(self) -> None:
        del self.session  # reference counting frees it; gc.collect() would cost ~0.3 s for nothing


def ort_session(model: Path | bytes, *, path: Path, provider: str, what: str = "the model") -> Any:
    """An onnxruntime session with llmconv's options (``LLMCONV_ORT_THREADS``, quiet logs) on ``provider``.

    Args:
        model: the ``.onnx`` file, or a serialized proto whose external data lie in ``path``'s folder
            (relative locations resolve there, and only inside it).
        path: the model's file, for messages and its external data.
        provider: ``cpu`` or ``cuda``.
        what: how messages name the model.
    Returns:
        The InferenceSession, running on the provider asked for.
    Raises:
        Unsupported: onnxruntime cannot load the model, or did not start the provider (it would have
            fallen back to the CPU, silently).
    """
    ort = _onnxruntime()
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    providers = _providers(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # its errors reach us as exceptions; printed they are noise
    threads = _ort_threads()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if isinstance(model, bytes):
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    banner = io.StringIO()
    try:
        # On a ValueError onnxruntime prints an "EP Error" banner to stdout and retries on the same CPU
        # provider: that would land in front of --json's one object. What it logs when a provider fails
        # to start goes to stderr; for CUDA we keep it, as the reason we give.
        with contextlib.redirect_stdout(banner), _stderr_kept(provider == "cuda") as logged, \
                warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                           providers=providers)
    except (ort_state.Fail, ort_state.InvalidGraph, ort_state.InvalidArgument, ort_state.InvalidProtobuf,
            ort_state.NoSuchFile, ort_state.NotImplemented, UnicodeDecodeError) as e:
        raise Unsupported(f"onnxruntime cannot load {what}: {_ort_message(e)}", path=path) from None
    active = session.get_providers()
    if not active or active[0] != providers[0]:
        del session
        log = [banner.getvalue(), *(str(w.message) for w in warned), logged.getvalue()]
        raise provider_failed(provider, _failure_reason(ort.get_available_providers(), providers[0],
                                                        active[0] if active else None, "\n".join(log)))
    return session


def run_session(session: Any, feed: dict[str, Any], names: list[str], *, path: Path) -> dict[str, np.ndarray]:
    """``names`` from ``session`` on the graph inputs of ``feed`` (cast to the types the graph takes).

    Raises:
        UsageError: the feed lacks an input the graph takes.
        GraphRunError: onnxruntime failed to run it (the node, its op type and the feed's shape named).
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as s

    types = {i.name: _ORT_TYPES.get(i.type) for i in session.get_inputs()}
    missing = [n for n in types if n not in feed]
    if missing:
        raise UsageError(f"the graph needs inputs llmconv cannot make: {', '.join(missing)}", path=path,
                         hint="give them to `llmconv verify REFERENCE CANDIDATE --inputs FILE.npz`")
    given = {n: (np.ascontiguousarray(feed[n], dtype=t) if t is not None else feed[n]) for n, t in types.items()}
    try:
        values = session.run(names, given)
    except (s.Fail, s.InvalidArgument, s.RuntimeException, UnicodeDecodeError) as e:
        op, node, detail = _ort_failure(e)
        raise GraphRunError(op=op, node=node, detail=detail, shape=main_shape(given), path=path) from None
    return dict(zip(names, values, strict=True))


# onnxruntime's message for a kernel that fails: "... while running Split node. Name:'/l.0/Split' Status Message: ..."
_NODE_FAILURE = re.compile(r"while running (?P<op>[^\s]+) node\. Name:'(?P<node>.*?)' Status Message: (?P<detail>.*)",
                           re.DOTALL)


def _ort_failure(e: Exception) -> tuple[str | None, str | None, str]:
    """(op type, node name, message) of an onnxruntime run failure; op and node are None when it names no node."""
    first, note = _ort_first_line(e)
    m = _NODE_FAILURE.search(first)
    if m is None:
        return None, None, _clip(first) + note
    return m.group("op"), m.group("node"), _clip(m.group("detail").strip()) + note


def _ort_message(e: Exception) -> str:
    """The first line of an onnxruntime error, at most 300 characters.

    onnxruntime quotes names and op types from the graph in its messages; when those are not UTF-8,
    its binding cannot make a str of the message and raises UnicodeDecodeError instead, holding the
    message's bytes: we show them with the bad bytes escaped.
    """
    first, note = _ort_first_line(e)
    return _clip(first) + note


def _ort_first_line(e: Exception) -> tuple[str, str]:
    note = ""
    if isinstance(e, UnicodeDecodeError):
        text = bytes(e.object).decode("utf-8", "backslashreplace")
        note = " (the graph holds names or op types that are not UTF-8, which ONNX does not allow)"
    else:
        text = str(e)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__), note


def _clip(text: str) -> str:
    return text if len(text) <= 300 else text[:297] + "..."


_EP_NAMES = {"cpu": "CPU", "cuda": "CUDA"}


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependency("onnxruntime is not installed", hint="pip install onnxruntime") from e
    return onnxruntime


def _providers(provider: str) -> list[str]:
    """The execution providers to ask onnxruntime for: the one named first, then the CPU for ops it lacks."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise UsageError(f"unknown --provider {provider!r}", hint="use cpu or cuda")


def provider_failed(provider: str, reason: str) -> Unsupported:
    """The error for an execution provider that onnxruntime did not start (it would have run on the CPU)."""
    ep = _EP_NAMES.get(provider, provider)
    return Unsupported(f"onnxruntime could not start the {ep} execution provider: {reason}; nothing was verified "
                       "on the GPU",
                       hint="install onnxruntime-gpu and the CUDA libraries it needs, or use --provider cpu")


def check_provider(provider: str) -> None:
    """Refuse, before any model is loaded, an execution provider this onnxruntime does not have at all.

    Whether an available one really starts is known only once a session exists (``OrtRunner``).

    Args:
        provider: ``cpu`` or ``cuda``.
    Raises:
        Unsupported: ``cuda`` with an onnxruntime that has no CUDA execution provider.
        UsageError: a provider name llmconv does not know.
    Example:
        >>> check_provider("cpu")
    """
    wanted = _providers(provider)[0]
    if wanted == "CPUExecutionProvider":
        return
    available = _onnxruntime().get_available_providers()
    if wanted not in available:
        raise provider_failed(provider, _failure_reason(available, wanted, None, ""))


def _failure_reason(available: list[str], wanted: str, active: str | None, log: str) -> str:
    """Why onnxruntime is not running ``wanted``: it lacks it, or the failure it logged, or that it fell back."""
    if wanted not in available:
        name = wanted.removesuffix("ExecutionProvider")
        return f"this onnxruntime has no {name} execution provider (available: {', '.join(available)})"
    for line in log.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip("* \t")
        if line == "EP Error" or not re.search(r"error|fail|cannot|could not|not found|no such", line, re.IGNORECASE):
            continue
        # onnxruntime's log lines: "<time> [E:onnxruntime:Default, file.cc:123 Func] <where> ... : FAIL : <why>"
        line = re.split(r"\bFAIL : |\] ", line)[-1].strip()
        line = line.removeprefix("EP Error").strip(" :")
        return line if len(line) <= 300 else line[:297] + "..."
    return f"onnxruntime ran the graph on {active or 'another provider'} instead"


@contextlib.contextmanager
def _stderr_kept(enabled: bool) -> Iterator[io.StringIO]:
    """What C++ code writes to the process's stderr during the block (when ``enabled``), kept off the terminal.

    onnxruntime logs a provider that fails to start (missing CUDA libraries) from C++, straight to
    file descriptor 2, and carries on with the CPU.
    """
    from llmconv.export._quiet import _debug, fd_redirected

    kept = io.StringIO()
    if not enabled or _debug():
        yield kept
        return
    import sys
    import tempfile

    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        try:
            with fd_redirected(2, sink.fileno()):
                yield kept
        finally:
            sink.seek(0)
            kept.write(sink.read(64 * 1024).decode("utf-8", "replace"))


class TorchRunner:
    """A transformers model in PyTorch (float32, eval mode), of the Auto class the task calls for."""

    kind = "torch"

    def __init__(self, sig: Signature, *, task: str) -> None:
        try:
            import torch
            import transformers
        except ImportError as e:
            raise MissingDependency("transformers is not installed", hint="pip install 'llmconv[onnx]'") from e
        from llmconv.export._quiet import quiet

        base = base_task(task)
        if base not in TASK_CLASSES:
            raise Unsupported(f"outputs mode does not run {task!r} models in PyTorch", path=sig.path,
                              hint="supported: " + ", ".join(sorted(TASK_CLASSES)))
        cls_name, self.main_output = TASK_CLASSES[base]
        self.sig = sig
        self.want_cache = task.endswith("-with-past")
        refuse_model_code(sig.config or {}, path=sig.path, auto_class=cls_name)
        if not (sig.config or {}).get("model_type"):
            # transformers would guess the architecture from the folder's name.
            raise UsageError("config.json has no model_type; running the model needs its architecture",
                             path=sig.path, hint='add "model_type" (e.g. "llama") to config.json')
        if sig.gguf_file is not None:
            self.model, info = _load_gguf(sig.gguf_file, cls_name)
        else:
            # Loaded from a view of its data files only: no Python of the folder (custom_generate/) can be imported.
            with transformers_view(sig.model_path, tokenizer=False) as view, quiet(), remote_code_refused(sig.path):
                self.model, info = getattr(transformers, cls_name).from_pretrained(
                    str(view), dtype=torch.float32, local_files_only=True, output_loading_info=True,
                    trust_remote_code=False)
        # Weights the checkpoint lacks are initialised at random, differently on each load: outputs
        # that depend on them compare noise with noise. A head for another task is the usual cause. Those
        # the compared output does not depend on (the pooler of a BertModel saved without one) do no harm.
        tied = _tied_keys(self.model) if getattr(self.model.config, "tie_word_embeddings", False) else set()
        missing = [k for k in info.get("missing_keys", []) if k not in tied]
        if missing:
            unused = _unused_weights(self.model, missing, self.main_output, _probe(self.model, sig))
            missing = [k for k in missing if k not in unused]
        if missing:
            del self.model
            shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
            raise UsageError(f"the checkpoint has no weights for {len(missing)} tensors that {cls_name} ({task}) "
                             f"needs ({shown}); they would be random", path=sig.path,
                             hint="choose the task the checkpoint was trained for (--task), e.g. feature-extraction "
                                  "for a bare encoder")
        self.model.eval()
        params = inspect.signature(self.model.forward).parameters
        self.positions = _usable_positions(self.model)
        runs = sig.patch(self.model) if sig.patch is not None else ""
        if sig.adapters:
            from llmconv.adapters import attach

            self.model, runs = attach(self.model, sig.adapters, runtime=sig.adapter_runtime)
        # What the feed holds is what a graph takes or the user gave; the rest the model makes by its own rule.
        self.accepts = {n for n in KNOWN_INPUTS if n in params}
        self.label = f"torch, transformers' GGUF loader ({task})" if sig.gguf_file is not None else f"torch ({task})"
        if runs:
            self.label = f"torch + {runs} ({task})"
        self._use_cache_param = "use_cache" in params
        self.outputs = [self.main_output]
        if self.want_cache:
            layers = _num_layers(sig.config or {})
            for i in range(layers):
                self.outputs += [f"present.{i}.key", f"present.{i}.value"]

    def run(self, feed: dict[str, Any], names: list[str]) -> dict[str, np.ndarray]:
        import torch

        length = int(np.shape(feed["input_ids"])[-1]) if "input_ids" in feed else 0
        if self.positions is not None and length > self.positions[0]:
            usable, pad = self.positions
            raise UsageError(f"an input of {length} tokens, but the model has {usable} positions: its position "
                             f"embeddings start after pad_token_id {pad}", path=self.sig.path,
                             hint=f"use --seq-len {usable} or less")
        kwargs: dict[str, Any] = {n: torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.accepts
                                  if n in feed}
        wants_cache = self.want_cache and any(n.startswith("present.") for n in names)
        if self._use_cache_param:
            kwargs["use_cache"] = wants_cache
        with torch.inference_mode():
            out = self.model(**kwargs, return_dict=True)
        result: dict[str, np.ndarray] = {}
        if self.main_output in names:
            result[self.main_output] = out[self.main_output].float().numpy()
        if wants_cache:
            for i, (k, v) in enumerate(_cache_layers(out.past_key_values)):
                for label, t in (("key", k), ("value", v)):
                    name = f"present.{i}.{label}"
                    if name in names:
                        result[name] = t.float().numpy()
        return result

    def forward_cached(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        """One step of ``generate()``: the new tokens, the full attention mask, their position ids (when the
        model's forward takes them, as ``prepare_inputs_for_generation`` gives them) and the cache (None
        at the prefill). Returns the logits of the new tokens and the cache to feed back."""
        import torch

        kwargs: dict[str, Any] = {"input_ids": torch.from_numpy(np.ascontiguousarray(ids)),
                                  "attention_mask": torch.from_numpy(np.ascontiguousarray(mask))}
        if "position_ids" in self.accepts:
            kwargs["position_ids"] = torch.from_numpy(np.ascontiguousarray(pos))
        with torch.inference_mode():
            out = self.model(**kwargs, past_key_values=cache, use_cache=True, return_dict=True)
        if out.past_key_values is None:
            raise Unsupported("the model returned no cache with use_cache=True", path=self.sig.path,
                              hint="verify with --decode-steps 0 --generate 0")
        return out.logits.float().numpy(), out.past_key_values

    def close(self) -> None:
        del self.model  # reference counting frees the weights (measured: no cycle keeps them)


def _load_gguf(path: Path, cls_name: str) -> tuple[Any, dict[str, Any]]:
    """A GGUF file loaded by transformers' own GGUF loader, in float32: the config its ``AutoConfig`` builds from the
    metadata, and the tensors its ``load_gguf_checkpoint`` dequantizes, names and lays out (the function
    ``from_pretrained(folder, gguf_file=...)`` calls; called directly, it does not need accelerate, whose presence
    changes how optimum exports a tied GPT-2)."""
    import torch
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from llmconv.export._quiet import quiet
    from llmconv.formats.gguf import BUFFER_SUFFIXES, metadata_of
    from llmconv.formats.gguf_arch import loader_overrides
    from llmconv.formats.hf import linked_view

    overrides = loader_overrides(metadata_of(path))
    bar = getattr(gguf_utils, "tqdm", None)
    with linked_view({path.name: path}) as view, quiet(), contextlib.ExitStack() as stack:
        if bar is not None:  # its "Converting and de-quantizing GGUF tensors..." bar (tqdm.auto, on stderr)
            gguf_utils.tqdm = lambda items, **_: items
            stack.callback(setattr, gguf_utils, "tqdm", bar)
        try:
            config = transformers.AutoConfig.from_pretrained(str(view), gguf_file=path.name, trust_remote_code=False,
                                                             **overrides)
            model = getattr(transformers, cls_name).from_config(config, dtype=torch.float32)
            parsed = gguf_utils.load_gguf_checkpoint(str(view / path.name), return_tensors=True,
                                                     model_to_load=model)
            result = model.load_state_dict(parsed["tensors"], strict=False)
        except ImportError as e:
            raise MissingDependency(f"transformers' GGUF loader needs a package that is missing: {e}",
                                    hint="pip install 'llmconv[gguf]'") from None
        except (ValueError, RuntimeError, KeyError, NotImplementedError) as e:
            raise Unsupported(f"transformers' GGUF loader cannot load it: {str(e).splitlines()[0]}", path=path) \
                from None
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k in result.missing_keys if not k.endswith(BUFFER_SUFFIXES)]
    return model, {"missing_keys": missing, "unexpected_keys": list(result.unexpected_keys)}


def _usable_positions(model: Any) -> tuple[int, int] | None:
    """(positions, pad id) of a model whose position embedding skips the rows up to its pad id (RoBERTa and its
    kin count positions from ``pad_token_id + 1``): its last ``pad + 1`` rows are out of reach. None for others."""
    import torch

    top = getattr(model.config, "max_position_embeddings", None)
    try:
        words = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        words = None
    for m in model.modules():
        if (isinstance(m, torch.nn.Embedding) and m is not words and m.padding_idx is not None
                and m.num_embeddings == top):
            return top - m.padding_idx - 1, m.padding_idx
    return None


def _tied_keys(model: Any) -> set[str]:
    """Names transformers ties to another weight on load: ``_tied_weights_keys`` is a list, a dict
    (name -> source, transformers 5) or None (a model with nothing to tie, BertModel)."""
    keys = getattr(model, "_tied_weights_keys", None)
    if isinstance(keys, str):
        return {keys}
    return set(keys) if isinstance(keys, list | tuple | set | dict) else set()


def _probe(model: Any, sig: Signature) -> dict[str, Any]:
    """The smallest input that runs ``model``: two tokens, or one image of the size it takes."""
    import torch

    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        image = sig.image or image_spec(sig.config, sig.model_path)
        return {"pixel_values": torch.zeros((1, image.num_channels, image.height, image.width))}
    vocab = int(getattr(model.config, "vocab_size", 0) or 2)
    return {"input_ids": torch.tensor([[1 % vocab, 2 % vocab]], dtype=torch.long)}


def _unused_weights(model: Any, names: list[str], output: str, feed: dict[str, Any]) -> set[str]:
    """Of the parameters ``names``, those ``output`` does not depend on, found by asking autograd on the
    input ``feed`` (a buffer, or a name that is no parameter, counts as used)."""
    import torch

    params = dict(model.named_parameters())
    probe = [n for n in names if n in params]
    if not probe:
        return set()
    before = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in probe)
    try:
        kwargs: dict[str, Any] = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters \
            else {}
        with torch.enable_grad():
            out = model(**feed, return_dict=True, **kwargs)[output]
            grads = (torch.autograd.grad(out.float().sum(), [params[n] for n in probe], allow_unused=True)
                     if out.requires_grad else [None] * len(probe))
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])
    return {n for n, g in zip(probe, grads, strict=True) if g is None}


def _cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    """(key, value) per layer from a transformers cache object or a legacy tuple."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "to_legacy_cache"):
        return [(k, v) for k, v, *_ in cache.to_legacy_cache()]
    return [(k, v) for k, v, *_ in cache]


def open_runner(sig: Signature, *, task: str, provider: str) -> OrtRunner | TorchRunner:
    """Load the model ``sig`` describes, ready to run.

    Args:
        sig: from :func:`describe`.
        task: the task settled for this side (:func:`settle_task`).
        provider: onnxruntime execution provider (``cpu`` or ``cuda``); PyTorch always runs on the CPU.
    Returns:
        A runner with ``outputs``, ``label`` (what ran it: ``onnxruntime (CPUExecutionProvider, fill-mask)``,
        ``torch (fill-mask)``), ``run(feed, names)`` and ``close()``.
    Example:
        >>> r = open_runner(describe(Path("m.onnx")), task="text-generation", provider="cpu")
    """
    if sig.kind == "onnxruntime":
        return OrtRunner(sig, provider=provider, task=task)
    if sig.kind == "torch":
        return TorchRunner(sig, task=task)
    raise InputError(f"no runner for {sig.kind}", path=sig.path)
