"""ONNX graph helpers shared by quantize and prune: safe loading, saving, linear layers, op counts.

onnx and onnxruntime are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmconv.errors import CorruptInput, InputError, MissingDependency, UsageError
from llmconv.io import safe_child

if TYPE_CHECKING:
    import onnx

# A protobuf cannot be serialized past 2 GiB; stay well under it before switching to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_ONNX_PIP = "pip install 'llmconv[onnx]' (onnx, onnxruntime, optimum)"
_FLOAT = 1  # onnx.TensorProto.FLOAT


def require_onnx() -> None:
    """Raise MissingDependency with the pip command when onnx or onnxruntime is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"ONNX support needs {e.name}", hint=_ONNX_PIP) from e


def onnx_file(path: Path) -> Path:
    """The ``.onnx`` file at ``path``: the path itself, or the one model in a folder (``model.onnx`` first)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return path / "model.onnx"
        found = sorted(path.glob("*.onnx"))
        if len(found) == 1:
            return found[0]
        if found:
            raise UsageError(f"folder holds {len(found)} ONNX models ({', '.join(p.name for p in found[:4])})",
                             path=path, hint="name the .onnx file to use")
    raise InputError("no ONNX model here", path=path)


# The metadata entry in which an ONNX output lists the external data files llmconv wrote for it (JSON list of
# names beside the model). With --force only those files of the replaced model are removed: a data file that
# another model shares, or that the model merely names, is never llmconv's to delete.
DATA_FILES_KEY = "llmconv.data_files"


def replaced_data_files(model_path: Path) -> tuple[list[Path], list[Path]]:
    """The data files of an existing ONNX destination that replacing it with ``--force`` may remove.

    Only files that the model uses, that its own ``llmconv.data_files`` record lists, and that bear a
    name llmconv gives the data of this destination (``<name>.data``, ``<name>_data``), as plain files
    (not links) beside it.

    Returns:
        ``(removable, left)``: the paths to remove once the new output is in place, and the other data
        files the model uses, which stay.
    """
    from llmconv.errors import LlmconvError

    if not model_path.is_file():
        return [], []
    try:
        model = load_model(model_path, with_data=False)
        used = external_data_files(model, model_path)
    except LlmconvError:
        return [], []
    recorded = set(_recorded_names(model))
    ours = {f"{model_path.name}.data", f"{model_path.name}_data"} & recorded
    removable = []
    for name in sorted(ours):
        p = model_path.parent / name
        if not p.is_symlink() and p.is_file() and p.resolve() in used:
            removable.append(p)
    kept = {p.resolve() for p in removable}
    return removable, [p for p in used if p not in kept]


def remove_replaced_data(old: list[Path], written: list[Path]) -> dict[Path, Path]:
    """Delete the data files of a replaced model (from :func:`replaced_data_files`) that the new one does not use
    and that no other ``*.onnx`` model in their folder reads (a user's copy of the old graph may).

    Args:
        old: the replaced model's data files.
        written: the files of the new output (the new model is no other model).
    Returns:
        The data files kept because another model reads them -> that model.
    """
    from llmconv.io import onnx_named_files

    keep = {p.resolve() for p in written}
    readers: dict[Path, Path] = {}
    for folder in dict.fromkeys(p.parent for p in old):
        for model in sorted(folder.glob("*.onnx")):
            if model.resolve() in keep or not model.is_file():
                continue
            for named in onnx_named_files(model):  # the locations only: no weights are read
                with contextlib.suppress(OSError, RuntimeError, ValueError):
                    readers.setdefault(named.resolve(), model)
    shared: dict[Path, Path] = {}
    for p in old:
        if p.resolve() in keep:
            continue
        if p.resolve() in readers:
            shared[p] = readers[p.resolve()]
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return shared


def _recorded_names(model: onnx.ModelProto) -> list[str]:
    import json

    for entry in model.metadata_props:
        if entry.key == DATA_FILES_KEY:
            try:
                names = json.loads(entry.value)
            except ValueError:
                return []
            return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    return []


def set_data_record(model: onnx.ModelProto, names: list[str]) -> bool:
    """Set (or, with no names, drop) the model's ``llmconv.data_files`` entry; whether it changed."""
    import json

    value = json.dumps(sorted(set(names)))
    entries = [e for e in model.metadata_props if e.key == DATA_FILES_KEY]
    if (not names and not entries) or (names and len(entries) == 1 and entries[0].value == value):
        return False
    keep = [(e.key, e.value) for e in model.metadata_props if e.key != DATA_FILES_KEY]
    del model.metadata_props[:]
    for k, v in keep + ([(DATA_FILES_KEY, value)] if names else []):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    return True


def record_data_files(model_path: Path) -> None:
    """Record in the ONNX file at ``model_path`` (which llmconv just wrote) the external data files it uses.

    Rewrites only the graph (the weights stay where they are), and only when the record changes.
    """
    import onnx

    from llmconv.export.onnx_post import external_locations
    from llmconv.formats.onnx import load_graph

    view = load_graph(model_path)  # the structure only: an inline 1.8 GB model costs no parse of its weights
    try:
        names = sorted(external_locations(view.model))
        if not set_data_record(view.model, names):
            return
    finally:
        view.close()
    model = onnx.load(str(model_path), load_external_data=False)
    set_data_record(model, names)
    onnx.save_model(model, str(model_path))


def external_data_files(model: onnx.ModelProto, model_path: Path) -> list[Path]:
    """The external data files ``model`` refers to, each checked to lie inside the model's folder.

    Raises:
        UnsafeInput: a reference is absolute or leaves the folder.
        CorruptInput: a referenced file is missing.
    """
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    files: dict[Path, None] = {}
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        target = safe_child(model_path.parent, info.location, what="external data file", source=model_path)
        if not target.is_file():
            raise CorruptInput(f"tensor {tensor.name!r} refers to external data file {info.location!r}, "
                               "which is missing", path=model_path, hint="keep the .data file beside the .onnx")
        size = target.stat().st_size
        offset = info.offset or 0
        if info.length is not None and offset + info.length > size or offset > size:
            raise CorruptInput(f"tensor {tensor.name!r} reads bytes {offset}..{offset + (info.length or 0)} of "
                               f"{info.location!r}, which holds {size} (truncated?)", path=model_path)
        files[target] = None
    return list(files)


def load_model(path: Path, *, with_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, checking its external-data references before reading them.

    Args:
        path: the ``.onnx`` file.
        with_data: also load the external data (else tensors keep their references).
    Returns:
        The ModelProto.
    """
    require_onnx()
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise CorruptInput(f"not a readable ONNX model ({type(e).__name__}: {e})", path=path) from e
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from e
    external = external_data_files(model, path)
    if with_data and external:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(path.parent))
    return model


def model_files(path: Path) -> list[Path]:
    """The ``.onnx`` file and the external data files it uses."""
    model = load_model(path, with_data=False)
    return [path, *external_data_files(model, path)]


def files_size(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def proto_size(model: onnx.ModelProto) -> int:
    """Serialized size of the model, counting external tensors by their length on disk."""
    return model.ByteSize()


def save_model(model: onnx.ModelProto, path: Path, *, external_data: bool) -> list[Path]:
    """Save ``model`` at ``path``; with ``external_data`` the tensors go to ``<name>.data`` beside it.

    Returns:
        The files written.
    """
    import onnx

    path = Path(path)
    if external_data:
        location = path.name + ".data"
        data = path.parent / location
        if data.exists() or data.is_symlink():
            data.unlink()  # onnx appends to an existing data file (or to what a link points at)
        set_data_record(model, [])  # the source's record, if it had one, is not this model's
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024, convert_attribute=False)
        record_data_files(path)  # none when every tensor was under the threshold
        return [path, data] if data.exists() else [path]
    set_data_record(model, [])
    onnx.save_model(model, str(path))
    return [path]


def needs_external_data(model: onnx.ModelProto, source_files: list[Path]) -> bool:
    """Whether an output derived from ``model`` should keep its tensors outside the proto."""
    if len(source_files) > 1:
        return True
    return files_size(source_files) > EXTERNAL_DATA_THRESHOLD


@dataclass(frozen=True)
class LinearNode:
    """A MatMul or Gemm node whose weight (input B) is a float32 initializer.

    Attributes:
        node: the node's name (made unique by :func:`name_nodes`).
        op: ``MatMul`` or ``Gemm``.
        weight: the initializer's name.
        shape: the weight's shape.
        in_axis: the weight axis that runs along the layer's input features (0 for ``x @ W``).
        is_output: whether the node writes a graph output directly (the LM head).
    """

    node: str
    op: str
    weight: str
    shape: tuple[int, ...]
    in_axis: int
    is_output: bool

    @property
    def out_axis(self) -> int:
        return 1 - self.in_axis


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a unique name, so they can be listed and quantized by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}" if not node.name else f"{node.name}_{i}"
        seen.add(node.name)


def linear_nodes(model: onnx.ModelProto) -> list[LinearNode]:
    """The graph's linear layers: MatMul/Gemm whose weight is a 2-D float32 initializer, in the main graph and in
    the bodies of its If/Loop/Scan nodes (a merged decoder's two branches read the main graph's weights)."""
    from llmconv.formats.onnx import iter_graphs

    graphs = list(iter_graphs(model.graph))
    inits = {t.name: t for g in graphs for t in g.initializer}
    outputs = {o.name for o in model.graph.output}
    found = []
    for node in (n for g in graphs for n in g.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        if w is None or w.data_type != _FLOAT or len(w.dims) != 2:
            continue
        in_axis = 0
        if node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            if "transB" in attrs and attrs["transB"].i:
                in_axis = 1
        found.append(LinearNode(node.name, node.op_type, w.name, tuple(w.dims), in_axis,
                                any(o in outputs for o in node.output)))
    return found


def op_histogram(model: onnx.ModelProto) -> Counter[str]:
    """Op type -> nodes, subgraphs included."""
    from llmconv.formats.onnx import iter_graphs

    return Counter(n.op_type for g in iter_graphs(model.graph) for n in g.node)


def float_linear_names(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> op type of the linear layers that still compute with float32 weights."""
    return {ln.node: ln.op for ln in linear_nodes(model)}


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(A, W, C)`` (alpha 1, beta 1, no transA) as ``MatMul(A, W) + C``, in place.

    onnxruntime's weight-only int4 quantizer takes MatMul only; GPT-2's linear layers export as Gemm.
    The rewrite computes the same values (a transposed weight is stored transposed once).

    Returns:
        The number of nodes rewritten.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    new_nodes = []
    count = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (w is None or w.data_type != _FLOAT or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            arr = numpy_helper.to_array(w).T.copy()
            weight = f"{w.name}_transposed"
            model.graph.initializer.append(numpy_helper.from_array(arr, weight))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=f"{node.name}_MatMul"))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                              name=f"{node.name}_Add"))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        used = {i for n in model.graph.node for i in n.input}
        keep = [t for t in model.graph.initializer if t.name in used]
        if len(keep) != len(model.graph.initializer):
            del model.graph.initializer[:]
            model.graph.initializer.extend(keep)
    return count


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """Keep onnxruntime's quantization tools from printing: they log through the root logger.

    The library never prints; what these tools would say is either in our report or noise.
    """
    root = logging.getLogger()
    old_level = root.level
    old_disable = logging.root.manager.disable
    logging.disable(logging.ERROR)
    root.setLevel(logging.ERROR)
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(4)  # errors come back as exceptions; printed they are noise
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import numpy as np

            with np.errstate(all="ignore"):
                yield
    finally:
        root.setLevel(old_level)
        logging.disable(old_disable)
        with contextlib.suppress(ImportError):
            import onnxruntime as ort

            ort.set_default_logger_severity(2)


def session(path: Path, *, threads: int = 0, provider: str = "cpu") -> Any:
    """An onnxruntime session on ``path`` (quiet, ``threads`` intra-op threads, 0 = default)."""
    require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except ort_errors() as e:
        raise CorruptInput(f"onnxruntime cannot load the model: {e}", path=path) from e


def check_loads(path: Path) -> None:
    """Make sure onnxruntime loads an output we wrote (the least check when verification is off)."""
    from llmconv.errors import ConversionError

    try:
        session(path)
    except CorruptInput as e:
        raise ConversionError(f"onnxruntime cannot load the output: {e.bare_message}", path=path,
                              hint="this is likely a bug; rerun with LLMCONV_DEBUG=1 and report it") from e


def ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception types (they derive from Exception, not RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidGraph", "InvalidArgument", "NoSuchFile", "NotImplemented", "RuntimeException",
             "InvalidProtobuf", "EPFail", "ModelLoaded", "NoModel", "EngineError")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError, ValueError)


def topological_sort(graph: onnx.GraphProto) -> bool:
    """Put ``graph``'s nodes in an order where each comes after the producers of its inputs (ONNX requires it;
    onnxruntime's float16 converter appends the Casts it inserts at the end). Values a node's subgraphs read
    from outside count as its inputs. Returns whether the order changed.

    Raises:
        ConversionError: the nodes form a cycle, or read a value nothing produces.
    """
    from llmconv.errors import ConversionError

    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    needs = [set(n.input) | _captured(n) for n in nodes]
    producer: dict[str, int] = {o: i for i, n in enumerate(nodes) for o in n.output}
    waiting = {i: {v for v in needs[i] if v not in available and v in producer} for i in range(len(nodes))}
    missing = [v for i in range(len(nodes)) for v in needs[i] if v not in available and v not in producer]
    if missing:
        raise ConversionError(f"node input {missing[0]!r} is produced by no node of the graph")
    users: dict[str, list[int]] = {}
    for i, vals in waiting.items():
        for v in vals:
            users.setdefault(v, []).append(i)
    ready = [i for i, vals in waiting.items() if not vals]
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for v in nodes[i].output:
            for j in users.get(v, []):
                waiting[j].discard(v)
                if not waiting[j]:
                    ready.append(j)
    if len(order) != len(nodes):
        raise ConversionError("the graph's nodes form a cycle")
    if order == sorted(order):
        return False
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    return True


def _captured(node: onnx.NodeProto) -> set[str]:
    """Values the subgraphs of ``node`` read from the enclosing scope."""
    import onnx

    from llmconv.formats.onnx import iter_graphs

    out: set[str] = set()
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subs:
            graphs = list(iter_graphs(sub))
            local = {o for g in graphs for n in g.node for o in n.output}
            local |= {v.name for g in graphs for v in [*g.input, *g.initializer]}
            out |= {i for g in graphs for n in g.node for i in n.input if i and i not in local}
    return out
