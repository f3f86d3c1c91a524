"""ONNX models: a ``.onnx`` file, with its external data file(s) beside it.

Opening a model lists every initializer (of the main graph and of its subgraphs) as a named
tensor, bit-exact, under its ONNX name. Only the graph's structure is parsed (:func:`load_graph`
skips the bytes of inline weights): inline weights are views of a private mapping of the model
file, and those in external data files views of a mapping of the data file, after a check that the
reference stays inside the model's folder (``safe_child``) and within the file's bounds. Opening
a 2 GB model costs milliseconds and no memory beyond the page cache.

Exporters name most initializers after the node that reads them (``onnx::MatMul_123``). A graph
llmconv exported carries a name record (``llmconv.tensor_map`` in its metadata) saying which
initializer holds which checkpoint tensor; :func:`restore_names` gives the checkpoint's names back
through it (``convert model.onnx out --to hf``).

ONNX graphs come from an exporter (``llmconv.export``), not from named tensors, so this format is
read-only here. ``onnx`` is imported when a model is opened, never when the module is imported.
"""

from __future__ import annotations

import mmap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmconv.errors import CorruptInput, InputError, MissingDependency, Unsupported, UsageError
from llmconv.formats.registry import Format, register
from llmconv.io import safe_child

if TYPE_CHECKING:
    import torch

    from llmconv.checkpoint import TensorSource

# TensorProto.DataType -> (torch dtype name, storage): "raw" dtypes map one to one; "packed" 4-bit
# (and smaller) types have no torch dtype and are handed out as their packed bytes (uint8).
_ONNX_TYPES: dict[int, str] = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
    10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128",
    16: "bfloat16", 17: "float8_e4m3fn", 19: "float8_e5m2",
}
_PACKED_TYPES: dict[int, tuple[str, int]] = {21: ("uint4", 4), 22: ("int4", 4), 23: ("float4e2m1", 4)}
_TYPE_NAMES = {0: "undefined", 8: "string", 18: "float8e4m3fnuz", 20: "float8e5m2fnuz", 24: "float8e8m0"}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_SNIFF_TAGS = (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72)  # fields 2,3,4,5,6,7,8,14 of ModelProto


def onnx_type_name(elem_type: int) -> str:
    """A readable name for an ONNX tensor element type."""
    if elem_type in _ONNX_TYPES:
        return _ONNX_TYPES[elem_type]
    if elem_type in _PACKED_TYPES:
        return _PACKED_TYPES[elem_type][0]
    return _TYPE_NAMES.get(elem_type, f"type{elem_type}")


def import_onnx() -> Any:
    """``import onnx``, or the pip command that installs it."""
    try:
        import onnx
    except ImportError as e:
        raise MissingDependency("the onnx package is not installed",
                                hint="pip install 'llmconv[onnx]' (or: pip install onnx onnxruntime)") from e
    return onnx


# optimum's layout of an encoder-decoder (T5, BART): one graph per part, in one folder.
SEQ2SEQ_ENCODER = "encoder_model.onnx"
SEQ2SEQ_DECODERS = ("decoder_model_merged.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


def is_seq2seq_folder(path: Path) -> bool:
    """Whether ``path`` is a folder in optimum's encoder-decoder layout: an encoder graph and a decoder graph."""
    path = Path(path)
    return (path.is_dir() and (path / SEQ2SEQ_ENCODER).is_file()
            and any((path / n).is_file() for n in SEQ2SEQ_DECODERS))


def model_file(path: Path) -> Path:
    """The ``.onnx`` file that ``path`` names: the file itself, or the one model in a folder.

    Args:
        path: a ``.onnx`` file, or a folder holding ``model.onnx`` (or a single ``*.onnx``).
    Returns:
        The path of the ``.onnx`` file.
    Example:
        >>> model_file(Path("gpt2-onnx"))
        PosixPath('gpt2-onnx/model.onnx')
    """
    path = Path(path)
    if path.is_file():
        return path
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    found = sorted(p for p in path.glob("*.onnx") if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError("folder holds no .onnx model", path=path)
    if is_seq2seq_folder(path):
        raise UsageError(f"this is an encoder-decoder: {len(found)} graphs ({', '.join(p.name for p in found[:4])}); "
                         "this command reads one", path=path, hint=f"name one graph, e.g. {path / SEQ2SEQ_ENCODER}")
    raise UsageError(f"folder holds {len(found)} .onnx models ({', '.join(p.name for p in found[:4])})", path=path,
                     hint="name the one you mean")


def _looks_like_onnx(head: bytes) -> bool:
    """ModelProto starts with field 1 (ir_version, a small varint), then another known field."""
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 30 and head[2] in _SNIFF_TAGS


def load_proto(path: Path, *, external: bool = False) -> Any:
    """Parse an ONNX file (without its external data unless ``external``), raising CorruptInput on failure."""
    onnx = import_onnx()
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=external)
    except DecodeError as e:
        raise CorruptInput(f"not a valid ONNX protobuf ({e})", path=path,
                           hint="the file is truncated or is not an ONNX model") from None
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from None


class GraphView:
    """A parsed ONNX model without the bytes of its inline weights, over a mapping of the file.

    Attributes:
        model: the ModelProto, whose main-graph initializers have no ``raw_data``.
        spans: per main-graph initializer (in order), ``(offset, length)`` of its ``raw_data`` in the
            file, or None when it holds none (typed fields, external data).
        buffer: the read-only mapping of the file the spans point into.
    """

    def __init__(self, model: Any, spans: list[tuple[int, int] | None], buffer: mmap.mmap) -> None:
        self.model, self.spans, self.buffer = model, spans, buffer

    def close(self) -> None:
        self.buffer.close()


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Protobuf wire-format fields in ``buf[start:end]``: (number, wire type, value start, value end, tag start)."""
    pos = start
    while pos < end:
        tag_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, value_end = _varint(buf, pos, end)
        elif wire == 1:
            value_end = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value_end = pos + length
        elif wire == 5:
            value_end = pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if value_end > end or number == 0:
            raise ValueError("field runs past the end of its message")
        yield number, wire, pos, value_end, tag_start
        pos = value_end


def load_graph(path: Path) -> GraphView:
    """Parse an ONNX file's structure and initializer headers, leaving inline weight bytes in the file.

    The model is read through a memory mapping: only the graph's nodes, inputs, outputs and the
    initializers' names, types, shapes and external-data entries are copied and parsed, so a 2 GB
    model costs milliseconds and no extra memory; :attr:`GraphView.spans` locate each weight.

    Args:
        path: the ``.onnx`` file.
    Returns:
        A GraphView (close it to release the mapping).
    Raises:
        CorruptInput: the bytes are not a well-formed ONNX protobuf, a string field is not UTF-8, an
            external-data location holds a NUL byte, or an initializer name is defined twice or is
            also a node's output.
    Example:
        >>> view = load_graph(Path("model.onnx")); view.model.graph.initializer[0].name
    """
    onnx = import_onnx()
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            # ACCESS_COPY: a private mapping torch may view as writable; the file is never changed.
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from None
    if buf is None:
        raise CorruptInput("the file is empty", path=path, hint="the file is truncated or is not an ONNX model")
    try:
        model, spans = _parse_structure(onnx, buf, size, path)
        _check_text(model, path)
        _check_initializer_names(model, path)
    except BaseException:
        buf.close()
        raise
    return GraphView(model, spans, buf)


def _parse_structure(onnx: Any, buf: mmap.mmap, size: int, path: Path) -> tuple[Any, list[tuple[int, int] | None]]:
    """The model parsed without the bytes of inline weights, and each main-graph initializer's (start, length)."""
    from google.protobuf.message import DecodeError

    try:
        head = bytearray()
        spans: list[tuple[int, int] | None] = []
        for number, wire, s, e, t in _fields(buf, 0, size):
            if number != 7 or wire != 2:
                head += buf[t:e]
                continue
            graph = bytearray()
            for gnum, gwire, gs, ge, gt in _fields(buf, s, e):
                if gnum != 5 or gwire != 2:
                    graph += buf[gt:ge]
                    continue
                tensor = bytearray()
                span = None
                for tnum, twire, ts, te, tt in _fields(buf, gs, ge):
                    if tnum == 9 and twire == 2:
                        span = (ts, te - ts)
                    else:
                        tensor += buf[tt:te]
                spans.append(span)
                graph += b"\x2a" + _encode_varint(len(tensor)) + tensor  # field 5, length-delimited
            head += b"\x3a" + _encode_varint(len(graph)) + graph  # field 7, length-delimited
        model = onnx.ModelProto()
        model.ParseFromString(bytes(head))
    except (ValueError, IndexError, DecodeError) as e:
        raise CorruptInput(f"not a valid ONNX protobuf ({e})", path=path,
                           hint="the file is truncated or is not an ONNX model") from None
    if len(model.graph.initializer) != len(spans):
        raise CorruptInput("initializers could not be located in the file", path=path)
    return model, spans


# descriptor full name -> (string fields, message fields), each as (name, repeated)
_LAYOUTS: dict[str, tuple[tuple[tuple[str, bool], ...], tuple[tuple[str, bool], ...]]] = {}


def _layout(descriptor: Any) -> tuple[tuple[tuple[str, bool], ...], tuple[tuple[str, bool], ...]]:
    if descriptor.full_name not in _LAYOUTS:
        strings = tuple((f.name, f.is_repeated) for f in descriptor.fields if f.type == f.TYPE_STRING)
        messages = tuple((f.name, f.is_repeated) for f in descriptor.fields if f.type == f.TYPE_MESSAGE)
        _LAYOUTS[descriptor.full_name] = (strings, messages)
    return _LAYOUTS[descriptor.full_name]


def _shown(raw: bytes, limit: int = 80) -> str:
    """Bytes that are not text, escaped and on one line (a 5,000-byte name is cut)."""
    return repr(raw[:limit]) + (f"... ({len(raw)} bytes)" if len(raw) > limit else "")


def _check_text(model: Any, path: Path) -> None:
    """Refuse string fields that are not UTF-8, and external-data locations holding a NUL byte.

    ONNX is proto2, whose parser does not check strings: upb hands a field that is not UTF-8 out as
    ``bytes`` instead of ``str``, which every later use (a sort, a dict key written as JSON, a path)
    trips over. Every string field of every message is checked here, once, so the rest of llmconv can
    trust the names. A quick pass over the set fields says whether all is well (0.2 s for 30,000
    nodes); only when it is not does a slower pass find the field to name.
    """
    if _text_ok(model):
        return
    _explain_text(model, path)
    raise CorruptInput("the graph holds text that is not valid UTF-8", path=path,
                       hint="the model is damaged; export it again")


def _text_ok(model: Any) -> bool:
    string, message = 9, 11  # FieldDescriptor.TYPE_STRING, TYPE_MESSAGE
    stack = [model]
    while stack:
        msg = stack.pop()
        for fd, value in msg.ListFields():
            kind = fd.type
            if kind == string:
                if any(v.__class__ is not str for v in value) if fd.is_repeated else value.__class__ is not str:
                    return False
            elif kind == message:
                if not fd.is_repeated:
                    stack.append(value)
                    continue
                stack.extend(value)
                if fd.name == "external_data" and any(e.key == "location" and "\x00" in str(e.value) for e in value):
                    return False
    return True


def _explain_text(model: Any, path: Path) -> None:
    """Raise CorruptInput naming the first field :func:`_text_ok` objects to (and its tensor)."""
    stack: list[tuple[Any, str, str | None]] = [(model, "model", None)]  # (message, field path, tensor name)
    while stack:
        msg, where, tensor = stack.pop()
        if msg.DESCRIPTOR.name == "TensorProto":
            kind = "initializer" if where.rpartition(".")[2].startswith("initializer[") else "tensor"
            if not isinstance(msg.name, str):
                raise CorruptInput(f"{kind} name {_shown(msg.name)} is not valid UTF-8 (at {where}.name)", path=path,
                                   hint="the model is damaged; export it again")
            tensor = f"{kind} {msg.name!r}"
            location = next((e.value for e in msg.external_data if e.key == "location"), "")
            if isinstance(location, str) and "\x00" in location:
                # No file name holds one; refused here, before any caller turns it into a path.
                raise CorruptInput(f"{tensor}: external data file path {location!r} holds a NUL byte", path=path,
                                   hint="fix the reference")
        strings, messages = _layout(msg.DESCRIPTOR)
        for name, repeated in strings:
            values = getattr(msg, name) if repeated else [getattr(msg, name)]
            for i, value in enumerate(values):
                if not isinstance(value, str):
                    field = f"{where}.{name}" + (f"[{i}]" if repeated else "")
                    owner = f"{tensor}: " if tensor is not None else ""
                    raise CorruptInput(f"{owner}{field} holds {_shown(value)}, which is not valid UTF-8", path=path,
                                       hint="the model is damaged; export it again")
        for name, repeated in messages:
            if repeated:
                stack.extend((m, f"{where}.{name}[{i}]", tensor) for i, m in enumerate(getattr(msg, name)))
            elif msg.HasField(name):
                stack.append((getattr(msg, name), f"{where}.{name}", tensor))


def _check_initializer_names(model: Any, path: Path) -> None:
    """Refuse a graph that defines an initializer name twice, or also as a node's output.

    Which of two definitions a runtime uses is unspecified: a reader keeping one drops a tensor unseen,
    and onnxruntime refuses an initializer that a node (a Constant, say) also produces. One pass over
    each graph's nodes, as :func:`iter_graphs` makes anyway.
    """
    for g in iter_graphs(model.graph):
        where = f" of subgraph {g.name!r}" if g is not model.graph else ""
        seen: set[str] = set()
        for t in (*g.initializer, *(s.values for s in g.sparse_initializer)):
            if t.name in seen:
                raise CorruptInput(f"initializer {t.name!r} is defined twice in the graph{where}", path=path,
                                   hint="the model is damaged; export it again")
            seen.add(t.name)
        if not seen:
            continue
        for node in g.node:
            for out in node.output:
                if out in seen:
                    producer = f"node {node.name!r} ({node.op_type})" if node.name else f"a {node.op_type} node"
                    raise CorruptInput(f"initializer {out!r} is also the output of {producer} in the graph{where}; "
                                       "onnxruntime refuses such a model", path=path,
                                       hint="the model is damaged; export it again")


def iter_graphs(graph: Any) -> Iterator[Any]:
    """A graph and, depth first, the subgraphs of its nodes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == 5:  # GRAPH
                yield from iter_graphs(attr.g)
            elif attr.type == 10:  # GRAPHS
                for g in attr.graphs:
                    yield from iter_graphs(g)


def _value_info(v: Any) -> dict[str, Any]:
    t = v.type.tensor_type
    shape: list[Any] | None = None
    if t.HasField("shape"):
        shape = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                 for d in t.shape.dim]
    return {"name": v.name, "dtype": onnx_type_name(t.elem_type), "shape": shape}


def describe_proto(model: Any) -> dict[str, Any]:
    """What ``inspect`` shows of an ONNX graph: opset, IR version, producer, inputs, outputs, ops."""
    ops: Counter[str] = Counter()
    for g in iter_graphs(model.graph):
        for node in g.node:
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            ops[f"{domain}.{node.op_type}" if domain else node.op_type] += 1
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    initializer_names = {i.name for i in model.graph.initializer}
    producer = f"{model.producer_name} {model.producer_version}".strip()
    return {
        "opset": opsets.get("ai.onnx"),
        "opsets": opsets,
        "ir_version": int(model.ir_version),
        "producer": producer or None,
        "inputs": [_value_info(v) for v in model.graph.input if v.name not in initializer_names],
        "outputs": [_value_info(v) for v in model.graph.output],
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "nodes": sum(ops.values()),
    }


def check_external_references(model: Any, mfile: Path) -> list[Path]:
    """Refuse external-data references that leave the model's folder (initializers and Constant values).

    Args:
        model: the parsed ModelProto (without its external data).
        mfile: the ``.onnx`` file it was read from.
    Returns:
        The external data files it references, resolved, in first-use order.
    Raises:
        UnsafeInput: a reference is absolute or leaves the model's folder.
        InputError: a referenced file is missing.
    """
    ext = _ExternalFiles(mfile.parent, mfile)
    seen: dict[Path, None] = {}
    for g in iter_graphs(model.graph):
        tensors = list(g.initializer)
        for node in g.node:
            for attr in node.attribute:
                if attr.type == 4:  # TENSOR
                    tensors.append(attr.t)
                elif attr.type == 9:  # TENSORS
                    tensors.extend(attr.tensors)
        for t in tensors:
            if t.data_location == _EXTERNAL:
                location = next((e.value for e in t.external_data if e.key == "location"), "")
                seen.setdefault(ext.resolve(location), None)
    return list(seen)


class _ExternalFiles:
    """Private read-only-in-effect mappings of the external data files, one per file, opened on demand."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root, self.model = root, model
        self._maps: dict[Path, mmap.mmap] = {}
        self._sizes: dict[Path, int] = {}

    def resolve(self, location: str) -> Path:
        p = safe_child(self.root, location, what="external data file", source=self.model)
        if not p.is_file():
            raise InputError(f"external data file {location!r} is missing", path=self.model,
                             hint="copy it beside the model; it travels with the .onnx file")
        return p

    def size(self, p: Path) -> int:
        if p not in self._sizes:
            self._sizes[p] = p.stat().st_size
        return self._sizes[p]

    def map(self, p: Path) -> mmap.mmap:
        if p not in self._maps:
            with open(p, "rb") as fh:
                # ACCESS_COPY: a private mapping that torch may view as writable; the file is never changed.
                self._maps[p] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[p]

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


# Inline tensors without raw_data, as the ONNX spec lays them out (onnx.proto, TensorProto): data type ->
# (typed field, little-endian dtype of one element of the bytes handed out). int32_data holds one value (or
# one bit pattern, for 16- and 8-bit floats) per element, and one byte per entry of the packed 4-bit types.
_TYPED_FIELDS: dict[int, tuple[str, str]] = {
    1: ("float_data", "<f4"), 14: ("float_data", "<f4"), 11: ("double_data", "<f8"), 15: ("double_data", "<f8"),
    7: ("int64_data", "<i8"), 12: ("uint64_data", "<u4"), 13: ("uint64_data", "<u8"),
    6: ("int32_data", "<i4"), 5: ("int32_data", "<i2"), 3: ("int32_data", "i1"), 2: ("int32_data", "u1"),
    9: ("int32_data", "u1"), 4: ("int32_data", "<u2"), 10: ("int32_data", "<u2"), 16: ("int32_data", "<u2"),
    17: ("int32_data", "u1"), 19: ("int32_data", "u1"), **dict.fromkeys(_PACKED_TYPES, ("int32_data", "u1")),
}
# How each typed field's values are read before they are cast to the element dtype.
_FIELD_DTYPES = {"float_data": "<f4", "double_data": "<f8", "int64_data": "<i8", "uint64_data": "<u8",
                 "int32_data": "<i8"}


def _inline_nbytes(t: Any) -> int:
    """How many bytes :func:`_inline_bytes` gives for ``t``, from the field lengths alone (nothing decoded)."""
    if t.HasField("raw_data") or t.raw_data:
        return len(t.raw_data)
    field, dtype = _TYPED_FIELDS.get(t.data_type, ("int32_data", "u1"))
    return len(getattr(t, field)) * int(dtype[-1])


def _inline_bytes(t: Any, name: str, model: Path) -> tuple[bytes, str]:
    """The little-endian bytes of an inline tensor, and how they were stored."""
    import numpy as np

    if t.HasField("raw_data") or t.raw_data:
        return bytes(t.raw_data), "raw"
    if t.data_type not in _TYPED_FIELDS:
        raise CorruptInput(f"initializer {name!r} has data type {onnx_type_name(t.data_type)} that llmconv cannot "
                           "read", path=model)
    field, dtype = _TYPED_FIELDS[t.data_type]
    return np.asarray(getattr(t, field), dtype=_FIELD_DTYPES[field]).astype(dtype).tobytes(), field


def open_model(path: Path) -> TensorSource:
    """Open an ONNX model as named tensors (its initializers), with ``details`` for ``inspect``.

    Args:
        path: a ``.onnx`` file, or a folder holding one.
    Returns:
        A TensorSource whose names are the ONNX initializer names. Packed 4-bit initializers are
        handed out as their packed bytes (uint8, 1-D) and listed in ``details["packed"]``.
    Raises:
        UnsafeInput: an external-data reference leaves the model's folder.
        CorruptInput: the protobuf cannot be parsed, or an external reference runs past its file.
    Example:
        >>> with open_model(Path("model.onnx")) as src:
        ...     src.names()[:2]
    """
    given = Path(path)
    mfile = model_file(given)
    view = load_graph(mfile)
    ext = _ExternalFiles(mfile.parent, mfile)
    try:
        return _open_view(given, mfile, view, ext)
    except BaseException:
        ext.close()
        view.close()
        raise


def _open_view(given: Path, mfile: Path, view: GraphView, ext: _ExternalFiles) -> TensorSource:
    import torch

    from llmconv.checkpoint import DTYPES_BY_NAME, TensorInfo, TensorSource, read_json

    root = mfile.parent
    model = view.model
    check_external_references(model, mfile)

    infos: dict[str, TensorInfo] = {}
    # name -> (tensor proto, offset, length, file): file None = inline (offset into the model file when the
    # bytes are raw_data, -1 when they sit in typed fields of the proto)
    entries: dict[str, tuple[Any, int, int, Path | None]] = {}
    packed: dict[str, dict[str, Any]] = {}
    data_files: list[Path] = []
    seen_files: set[Path] = set()
    external: list[tuple[Path, int, int, str, str]] = []  # (file, start, end, initializer, location)
    main = model.graph
    for g in iter_graphs(main):
        if g.sparse_initializer:
            name = g.sparse_initializer[0].values.name
            raise Unsupported(f"initializer {name!r} is a sparse_initializer, which llmconv does not read as a "
                              "named tensor", path=mfile,
                              hint="store it as a dense initializer, or compare outputs with --mode outputs")
        for index, t in enumerate(g.initializer):
            name = t.name
            if name in infos:
                continue  # a subgraph initializer that shadows an outer one: the outer one is the weight
            if not name:
                raise CorruptInput("an initializer has no name", path=mfile)
            shape = tuple(int(d) for d in t.dims)
            if any(d < 0 for d in shape):
                raise CorruptInput(f"initializer {name!r} has a negative dimension {list(shape)}", path=mfile)
            numel = 1
            for d in shape:
                numel *= d
            if t.data_type in _ONNX_TYPES:
                dtype = DTYPES_BY_NAME[_ONNX_TYPES[t.data_type]]
                info = TensorInfo(name, dtype, shape)
            elif t.data_type in _PACKED_TYPES:
                kind, bits = _PACKED_TYPES[t.data_type]
                nbytes = (numel * bits + 7) // 8
                info = TensorInfo(name, torch.uint8, (nbytes,))
                packed[name] = {"dtype": kind, "shape": list(shape)}
            else:
                raise CorruptInput(f"initializer {name!r} has data type {onnx_type_name(t.data_type)}, which "
                                   "llmconv cannot represent as a tensor", path=mfile)
            if t.data_location == _EXTERNAL:
                kv = {e.key: e.value for e in t.external_data}
                location = kv.get("location", "")
                p = ext.resolve(location)
                try:
                    offset = int(kv.get("offset", "0"))
                    length = int(kv.get("length", str(info.nbytes)))
                except ValueError:
                    raise CorruptInput(f"initializer {name!r} has a non-numeric external offset or length",
                                       path=mfile) from None
                if length != info.nbytes:
                    raise CorruptInput(f"initializer {name!r} claims {length} bytes of {location!r} but shape "
                                       f"{list(shape)} needs {info.nbytes}", path=mfile)
                if offset < 0 or offset + length > ext.size(p):
                    raise CorruptInput(f"initializer {name!r} reads bytes {offset}..{offset + length} of "
                                       f"{location!r}, which holds {ext.size(p)} (truncated?)", path=mfile)
                entries[name] = (None, offset, length, p)
                external.append((p, offset, offset + length, name, location))
                if p not in seen_files:
                    seen_files.add(p)
                    data_files.append(p)
            else:
                span = view.spans[index] if g is main else None
                held = span[1] if span is not None else _inline_nbytes(t)
                if held != info.nbytes:
                    raise CorruptInput(f"initializer {name!r} holds {held} bytes but shape {list(shape)} of "
                                       f"{onnx_type_name(t.data_type)} needs {info.nbytes}", path=mfile)
                entries[name] = (t, span[0] if span else -1, info.nbytes, None)
            infos[name] = info
    _check_external_overlaps(external, mfile)

    def load(name: str) -> torch.Tensor:
        info = infos[name]
        tensor, offset, length, p = entries[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if p is not None:
            flat = torch.frombuffer(ext.map(p), dtype=info.dtype, count=info.numel, offset=offset)
            return flat.view(info.shape)
        if offset >= 0:  # raw_data of the model file: a view of its mapping
            return torch.frombuffer(view.buffer, dtype=info.dtype, count=info.numel, offset=offset).view(info.shape)
        raw, _ = _inline_bytes(tensor, name, mfile)
        if len(raw) != info.nbytes:
            raise CorruptInput(f"initializer {name!r} holds {len(raw)} bytes but shape {list(info.shape)} of "
                               f"{info.dtype} needs {info.nbytes}", path=mfile)
        return torch.frombuffer(bytearray(raw), dtype=info.dtype, count=info.numel).view(info.shape)

    details = describe_proto(model)
    details["initializers"] = len(infos)
    details["initializer_bytes"] = sum(i.nbytes for i in infos.values())
    details["external_data"] = [str(p.relative_to(root.resolve())) for p in data_files]
    if packed:
        details["packed"] = packed
    metadata = {p.key: p.value for p in model.metadata_props if p.key != TENSOR_MAP_KEY}
    recorded = [p.value for p in model.metadata_props if p.key == TENSOR_MAP_KEY]
    if recorded:
        details["name_record"] = _record_summary(recorded, mfile)
    config = None
    if (root / "config.json").is_file():
        parsed = read_json(root / "config.json", what="config.json")
        config = parsed if isinstance(parsed, dict) else None
    files = [mfile] + [root / p.relative_to(root.resolve()) for p in data_files]
    src = TensorSource(format="onnx", path=given, infos=infos, loader=load, metadata=metadata, config=config,
                       weights_format="onnx", files=files, zero_copy=True, details=details)
    src._closers += [ext.close, view.close]
    return src


def _check_external_overlaps(external: list[tuple[Path, int, int, str, str]], mfile: Path) -> None:
    """Refuse two initializers whose external byte ranges in one data file overlap.

    No writer (onnx, optimum, torch.onnx) gives two initializers overlapping ranges; a file that does
    turns a few bytes into one copy per initializer on conversion (100 names on 1 MB: 100 MB). Sorted
    by offset, each range is compared with the furthest-reaching one before it: O(n log n).
    """
    by_file: dict[Path, list[tuple[int, int, str, str]]] = {}
    for p, start, end, name, location in external:
        if end > start:
            by_file.setdefault(p, []).append((start, end, name, location))
    for ranges in by_file.values():
        ranges.sort()
        reach, owner = -1, ""
        for start, end, name, location in ranges:
            if start < reach:
                raise CorruptInput(f"initializers {owner!r} and {name!r} both read bytes {start}..{min(end, reach)} "
                                   f"of {location!r}; each initializer's external data has its own range",
                                   path=mfile, hint="the model is damaged; export it again")
            if end > reach:
                reach, owner = end, name


# ---- the name record: which initializer holds which checkpoint tensor ------------------------------------------

# The ModelProto metadata entry llmconv's export writes (llmconv.export.onnx_post.match_checkpoint): JSON naming,
# for every tensor of the checkpoint exported, the initializer that holds it and how (as stored, or transposed: the
# exporter folds ``x @ W.T`` into a transposed initializer), with the config.json an hf folder needs. Exporters
# name most initializers after the node that reads them (``onnx::MatMul_123``); only this record gives a graph's
# weights their checkpoint names back.
TENSOR_MAP_KEY = "llmconv.tensor_map"
TENSOR_MAP_SCHEMA = "llmconv.tensor_map/1"
TRANSFORMS = ("identity", "transpose")
_NO_RECORD = ("the graph carries no name record (it was exported by another tool, or by an llmconv older than "
              "the record), so its initializers have only ONNX names such as onnx::MatMul_123")
SEQ2SEQ_NO_RECORD = ("it is one graph of an encoder-decoder export, and llmconv records checkpoint names for "
                     "single-graph exports only (decoder-only and encoder models)")
_RECORD_HINT = "export the model again with `llmconv convert HF_FOLDER OUT --to onnx`, which records the names"


@dataclass(frozen=True)
class Holder:
    """An initializer holding a checkpoint tensor: ``transform`` is ``identity`` (the same bytes) or ``transpose``."""

    initializer: str
    transform: str


@dataclass(frozen=True)
class RecordedTensor:
    """A checkpoint tensor as the record lists it: its dtype and shape in the checkpoint, and the initializers
    holding it (the first is the one restored; none when the exporter folded it into something else)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    holders: tuple[Holder, ...]


@dataclass
class NameRecord:
    """A graph's ``llmconv.tensor_map`` entry, parsed and checked.

    Attributes:
        tensors: checkpoint name -> RecordedTensor, every tensor of the checkpoint (absent ones included).
        aliases: checkpoint names that shared another's storage in the checkpoint -> that name.
        config: the checkpoint's config.json.
        metadata: the checkpoint's own string metadata (safetensors ``__metadata__``).
        dtype: the checkpoint's dominant floating-point dtype.
        unavailable: why there is no usable record (a quantized graph, one part of an encoder-decoder), or None.
    """

    tensors: dict[str, RecordedTensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: str | None = None
    unavailable: str | None = None

    def held(self) -> dict[str, RecordedTensor]:
        """The tensors some initializer holds."""
        return {n: t for n, t in self.tensors.items() if t.holders}

    def absent(self) -> list[str]:
        """The tensors no initializer holds as they are (folded into other constants by the exporter)."""
        return [n for n, t in self.tensors.items() if not t.holders]

    def summary(self) -> dict[str, Any]:
        """How many tensors the record restores, how many of them transposed back, and the absent ones."""
        held = self.held()
        return {"tensors": len(held), "transposed": sum(t.holders[0].transform == "transpose" for t in held.values()),
                "absent": self.absent()}

    def to_json(self) -> dict[str, Any]:
        """The JSON written into the graph (keys sorted when dumped, so that an export is byte-identical)."""
        if self.unavailable is not None:
            return {"schema": TENSOR_MAP_SCHEMA, "unavailable": self.unavailable}
        tensors: dict[str, Any] = {}
        absent: dict[str, Any] = {}
        for n, t in self.tensors.items():
            entry: dict[str, Any] = {"dtype": t.dtype, "shape": list(t.shape)}
            if not t.holders:
                absent[n] = entry
                continue
            first, *copies = t.holders
            entry.update(initializer=first.initializer, transform=first.transform)
            if copies:
                entry["copies"] = [{"initializer": h.initializer, "transform": h.transform} for h in copies]
            tensors[n] = entry
        return {"schema": TENSOR_MAP_SCHEMA, "dtype": self.dtype, "config": self.config, "metadata": self.metadata,
                "tensors": tensors, "absent": absent, "aliases": self.aliases}


def parse_name_record(text: str, *, path: Path) -> NameRecord:
    """Parse a ``llmconv.tensor_map`` value (untrusted: any graph may carry one).

    Raises:
        CorruptInput: not JSON, another schema, or a field of the wrong type (the message names it).
    """
    import json

    from llmconv.checkpoint import DTYPES_BY_NAME, check_config

    def bad(what: str) -> CorruptInput:
        return CorruptInput(f"the graph's {TENSOR_MAP_KEY} record is malformed: {what}", path=path,
                            hint=_RECORD_HINT)

    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise bad(f"not JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("schema") != TENSOR_MAP_SCHEMA:
        raise bad(f"schema is not {TENSOR_MAP_SCHEMA}")
    if "unavailable" in raw:
        if not isinstance(raw["unavailable"], str):
            raise bad("'unavailable' is not a string")
        return NameRecord(unavailable=raw["unavailable"])
    config, metadata = raw.get("config"), raw.get("metadata", {})
    if not isinstance(config, dict):
        raise bad("'config' is not a config.json object")
    check_config(config, path=path)
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad("'metadata' does not map strings to strings")
    record = NameRecord(config=config, metadata=dict(metadata), dtype=raw.get("dtype") if isinstance(
        raw.get("dtype"), str) else None)

    def entry(name: Any, e: Any, *, held: bool) -> RecordedTensor:
        if not isinstance(name, str) or not isinstance(e, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, copies = e.get("dtype"), e.get("shape"), e.get("copies", [])
        if not isinstance(dtype, str) or dtype not in DTYPES_BY_NAME:
            raise bad(f"tensor {name!r} has dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise bad(f"tensor {name!r} has shape {shape!r}")
        if not isinstance(copies, list):
            raise bad(f"tensor {name!r} has copies {copies!r}")
        holders = []
        for h in ([e, *copies] if held else []):
            if not isinstance(h, dict) or not isinstance(h.get("initializer"), str) or h.get("transform") not in \
                    TRANSFORMS:
                raise bad(f"tensor {name!r} names no initializer and transform ({', '.join(TRANSFORMS)})")
            if h["transform"] == "transpose" and len(shape) != 2:
                raise bad(f"tensor {name!r} of shape {shape} is said to be held transposed")
            holders.append(Holder(h["initializer"], h["transform"]))
        return RecordedTensor(name, dtype, tuple(shape), tuple(holders))

    for key, held in (("tensors", True), ("absent", False)):
        table = raw.get(key, {})
        if not isinstance(table, dict) or (held and not table):
            raise bad(f"'{key}' is not an object" + (" of tensors" if held else ""))
        for name, e in table.items():
            if name in record.tensors:
                raise bad(f"tensor {name!r} is listed twice")
            record.tensors[name] = entry(name, e, held=held)
    aliases = raw.get("aliases", {})
    if not (isinstance(aliases, dict) and all(isinstance(v, str) and v in record.tensors and k not in record.tensors
                                              for k, v in aliases.items())):
        raise bad("'aliases' does not map new names to recorded tensors")
    record.aliases = dict(aliases)
    return record


def name_record_values(mfile: Path) -> list[str]:
    """The raw name-record entries in the metadata of the graph file ``mfile`` (its weights are not read)."""
    view = load_graph(mfile)
    try:
        return [p.value for p in view.model.metadata_props if p.key == TENSOR_MAP_KEY]
    finally:
        view.close()


def read_name_record(path: Path) -> NameRecord | None:
    """The name record of the ONNX model at ``path`` (a file or a folder holding one), or None when it has none.

    Only the graph's structure is read (the weights stay in the file).

    Raises:
        CorruptInput: the record is malformed (:func:`parse_name_record`) or present twice.
    """
    mfile = model_file(Path(path))
    found = name_record_values(mfile)
    if not found:
        return None
    if len(found) > 1:
        raise CorruptInput(f"the graph carries {len(found)} {TENSOR_MAP_KEY} records", path=mfile, hint=_RECORD_HINT)
    return parse_name_record(found[0], path=mfile)


def _record_summary(values: list[str], mfile: Path) -> dict[str, Any]:
    """What ``inspect`` shows of a graph's name record (the record itself is for the readers)."""
    try:
        if len(values) > 1:
            raise CorruptInput(f"the graph carries {len(values)} {TENSOR_MAP_KEY} records", path=mfile)
        record = parse_name_record(values[0], path=mfile)
    except CorruptInput as e:
        return {"error": e.bare_message}
    if record.unavailable is not None:
        return {"unavailable": record.unavailable}
    return {**record.summary(), "model_type": (record.config or {}).get("model_type"), "dtype": record.dtype}


def record_mismatch(record: NameRecord, source: TensorSource) -> str | None:
    """Why ``record`` does not describe the initializers of ``source`` (the graph it came with), or None.

    Each holder must still be an initializer of the shape the record implies and of the dtype the export
    gives the checkpoint's tensor (float32 for floating-point tensors). A quantized or float16 graph, or one
    whose initializers were renamed, fails here, naming the first tensor it no longer holds.
    """
    from llmconv.checkpoint import DTYPES_BY_NAME, dtype_name

    for name, t in record.held().items():
        for h in t.holders:
            info = source.infos.get(h.initializer)
            if info is None:
                return f"it holds {name} in initializer {h.initializer!r}, which the graph no longer has"
            want_dtype = exported_dtype(DTYPES_BY_NAME[t.dtype])
            shape = t.shape[::-1] if h.transform == "transpose" else t.shape
            if info.dtype != want_dtype or tuple(info.shape) != shape:
                return (f"it holds {name} ({t.dtype} {list(t.shape)}) in initializer {h.initializer!r}, which is now "
                        f"{dtype_name(info.dtype)} {list(info.shape)}, not {dtype_name(want_dtype)} {list(shape)}")
    return None


def exported_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an export gives a checkpoint tensor: float32 for floating point (graphs are exported in float32)."""
    import torch

    return torch.float32 if dtype.is_floating_point else dtype


def held_tensor(source: TensorSource, holder: Holder, dtype: torch.dtype) -> torch.Tensor:
    """The checkpoint tensor ``holder`` holds in the graph ``source``: transposed back, in the checkpoint's dtype.

    The cast back is exact: the export widened the checkpoint's values to float32.
    """
    t = source.tensor(holder.initializer)
    if holder.transform == "transpose":
        t = t.t()
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def restore_names(source: TensorSource, *, for_hf: bool) -> tuple[TensorSource, list[str]]:
    """The graph ``source`` (from :func:`open_model`) as the checkpoint it was exported from, through its name record.

    With a record, the tensors come out under the checkpoint's names, transposes undone, in the checkpoint's
    dtype, with the checkpoint's ties (aliases) and config.json; for an hf folder, ``extra_files`` holds that
    config.json and the tokenizer and generation files beside the graph (when it sits in a model folder).
    Without one, ``source`` is returned as it is (ONNX names), with a note saying so.

    Args:
        source: the opened graph; closing it also removes what the view made (its config.json).
        for_hf: the view is for an hf folder, which needs checkpoint names: no usable record is an error.
    Returns:
        (the view, notes for the conversion report).
    Raises:
        Unsupported: ``for_hf`` and the graph carries no usable record (none, a quantized graph, a record its
            initializers no longer match), or the exporter folded a parameter of the model into another constant.
        CorruptInput: the record is malformed.
    Example:
        >>> with open_model(Path("llama-onnx")) as g:
        ...     view, notes = restore_names(g, for_hf=True); view.names()[0]
        'lm_head.weight'
    """
    from llmconv.checkpoint import DTYPES_BY_NAME, TensorInfo, TensorSource

    mfile = source.files[0]
    record = read_name_record(mfile)
    why, hint = (_NO_RECORD, _RECORD_HINT) if record is None else (record.unavailable, None)
    if why is None and record is not None:
        mismatch = record_mismatch(record, source)
        if mismatch is not None:
            why, hint = f"its name record no longer matches its initializers: {mismatch} (changed after export)", \
                _RECORD_HINT
    if why is not None:
        if for_hf:
            onnx_names = "--to safetensors writes the initializers under their ONNX names"
            raise Unsupported(f"cannot write an hf folder from this graph: {why}", path=source.path,
                              hint=f"{hint}; {onnx_names}" if hint else onnx_names)
        return source, [f"tensors keep their ONNX initializer names: {why}"]
    assert record is not None
    notes: list[str] = []
    absent = record.absent()
    if absent:
        _check_absent(record, absent, for_hf=for_hf, path=source.path, notes=notes)
    held = record.held()
    infos = {n: TensorInfo(n, DTYPES_BY_NAME[t.dtype], t.shape) for n, t in held.items()}
    aliases = {a: c for a, c in record.aliases.items() if c in held}
    for alias, canon in aliases.items():
        infos[alias] = TensorInfo(alias, infos[canon].dtype, infos[canon].shape)

    def load(name: str) -> torch.Tensor:
        t = held[aliases.get(name, name)]
        return held_tensor(source, t.holders[0], DTYPES_BY_NAME[t.dtype])

    extra: list[Path] = []
    if for_hf:
        extra = _hf_files(source, mfile, record, notes)
    notes.insert(0, f"checkpoint names restored from the graph's name record ({len(held)} tensors, "
                    f"{record.summary()['transposed']} transposed back)")
    view = TensorSource(format="onnx", path=mfile, infos=infos, loader=load, aliases=aliases,
                        metadata=dict(record.metadata), config=record.config, weights_format="onnx",
                        files=list(source.files), extra_files=extra, zero_copy=False,
                        details={"restored": len(held)})
    return view, notes


def _check_absent(record: NameRecord, absent: list[str], *, for_hf: bool, path: Path, notes: list[str]) -> None:
    """Refuse (for an hf folder) checkpoint tensors the graph does not hold that the model needs; note the rest."""
    from llmconv.architecture import describe

    arch = describe(record.config)
    needed = [n for n in absent if arch is None or arch.own_name(n) is not None]
    shown = ", ".join(absent[:6]) + (" ..." if len(absent) > 6 else "")
    if needed and for_hf:
        which = f"a parameter of {arch.model_class}" if arch is not None else "a tensor of the checkpoint"
        raise Unsupported(f"cannot write an hf folder from this graph: the exporter folded {needed[0]} ({which}) into "
                          f"other constants, so no initializer holds it ({len(needed)} such tensors)", path=path,
                          hint="convert the original checkpoint instead; --to safetensors writes the tensors the "
                               "graph holds")
    why = "folded by the exporter into other constants" if needed else \
        f"not parameters of {arch.model_class if arch else 'the model'}: from_pretrained does not read them"
    notes.append(f"{len(absent)} checkpoint tensor(s) the graph does not hold, left out ({why}): {shown}")


def _hf_files(source: TensorSource, mfile: Path, record: NameRecord, notes: list[str]) -> list[Path]:
    """config.json from the record (written to a scratch folder that closing ``source`` removes), and the tokenizer
    and generation files beside the graph when it sits in a model folder (one with a config.json)."""
    import contextlib
    import json
    import tempfile

    from llmconv.export.exporters import CARRIED_PREFIXES
    from llmconv.formats.hf import outside_reason, skipped_note
    from llmconv.io import scratch_dir

    stack = contextlib.ExitStack()
    scratch = Path(stack.enter_context(scratch_dir(Path(tempfile.gettempdir()) / "llmconv-config")))
    source._closers.append(stack.close)
    config = scratch / "config.json"
    # As transformers' to_json_string writes it.
    config.write_text(json.dumps(record.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    files = [config]
    folder = mfile.parent
    if not (folder / "config.json").is_file():
        notes.append("config.json comes from the graph's name record; no tokenizer or generation files: the graph "
                     "does not sit in a model folder")
        return files
    skipped: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.name == "config.json" or not p.name.startswith(CARRIED_PREFIXES) or not (p.is_file() or p.is_symlink()):
            continue
        reason = outside_reason(folder, p)
        if reason is None:
            files.append(p)
        else:
            skipped.append(reason)
    if skipped:
        notes.append(skipped_note(skipped))
    return files


class OnnxFormat(Format):
    name = "onnx"
    description = "ONNX model (.onnx), with external data files beside it"
    extensions = (".onnx",)
    writable = False
    priority = 5

    def sniff(self, path: Path, head: bytes) -> bool:
        if path.is_dir():
            return ((path / "model.onnx").is_file() or len([p for p in path.glob("*.onnx") if p.is_file()]) == 1
                    or is_seq2seq_folder(path))
        return _looks_like_onnx(head)

    def open(self, path: Path) -> TensorSource:
        return open_model(Path(path))


FORMAT = register(OnnxFormat())
