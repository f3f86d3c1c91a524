"""safetensors: a single file, or a folder of shards with ``model.safetensors.index.json``.

Reading validates the file with the safetensors library, then maps it and hands out zero-copy
views. Writing streams one tensor at a time (the library's ``save_file`` needs every tensor in
memory at once), in the layout safetensors itself writes: tensors ordered by dtype (the library's order) then name,
header padded to 8 bytes.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from llmconv import progress as status
from llmconv.checkpoint import TensorInfo, TensorSource, dtype_name, packed_values
from llmconv.errors import CorruptInput, InputError, UsageError
from llmconv.formats import sharding
from llmconv.formats.registry import Format, WriteOptions, register
from llmconv.io import open_output, write_sliced

# Every dtype name of the safetensors format, with the torch dtype that holds it. What is read and written is
# the part of this table that the installed safetensors library itself handles (its ``_SIZE`` table, which
# grows with its releases) and that this torch has: a file the library reads, llmconv reads.
_ST_TORCH = (("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
             ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
             ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
             ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"), ("F4", "float4_e2m1fn_x2"),
             ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"))


def _library_dtypes() -> dict[str, torch.dtype]:
    try:
        from safetensors.torch import _SIZE as handled  # the library's own table of the dtypes it handles
    except ImportError:  # a release that moved it: every dtype this torch has
        handled = None
    table = {}
    for name, attr in _ST_TORCH:
        dt = getattr(torch, attr, None)
        if dt is not None and (handled is None or dt in handled):
            table[name] = dt
    return table


ST_DTYPES: dict[str, torch.dtype] = _library_dtypes()
# A safetensors F4 header counts 4-bit values and torch's float4_e2m1fn_x2 holds two per byte, so the header's
# last dimension is twice torch's (checkpoint.packed_values).
_PACKED = {name: packed_values(dt) for name, dt in ST_DTYPES.items() if packed_values(dt) > 1}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
# The order the safetensors library lays tensors out in (its Dtype enum, descending), then by name;
# following it makes our files byte-identical to save_file's.
_LAYOUT_ORDER = {name: i for i, name in enumerate(
    ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E5M2FNUZ", "F8_E4M3FNUZ",
     "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8", "F4", "BOOL"))}


def _torch_shape(dtype: str, shape: list[int]) -> tuple[int, ...] | None:
    """The torch shape of a header's shape (None: a packed dtype whose last dimension does not divide)."""
    per = _PACKED.get(dtype, 1)
    if per == 1:
        return tuple(shape)
    if not shape or shape[-1] % per:
        return None
    return (*shape[:-1], shape[-1] // per)


def _header_shape(dtype: str, shape: tuple[int, ...]) -> list[int]:
    per = _PACKED.get(dtype, 1)
    return list(shape) if per == 1 or not shape else [*shape[:-1], shape[-1] * per]


_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptInput("file is shorter than a safetensors header (8 bytes)", path=path)
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CorruptInput(f"header length {n} runs past the end of the {size}-byte file (truncated?)",
                               path=path)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptInput(f"header is not valid JSON ({e})", path=path) from e
        except ValueError as e:  # an integer of more digits than Python converts
            raise CorruptInput(f"header holds a number too long to read ({str(e).split(':')[0]})", path=path) from None
        except RecursionError:
            raise CorruptInput("header nests JSON too deeply to read", path=path) from None
    if not isinstance(header, dict):
        raise CorruptInput("header is not a JSON object", path=path)
    return header, 8 + n


def _gist(value: object, limit: int = 60) -> str:
    """A header value for a one-line message, cut short: headers are written by whoever made the file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validate(path: Path, header: dict, data_start: int) -> tuple[dict[str, TensorInfo], dict[str, int], dict]:
    """Check dtypes, shapes and offsets (contiguous, in bounds, no overlap); return infos and offsets."""
    size = path.stat().st_size
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CorruptInput("__metadata__ must map strings to strings", path=path)
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise CorruptInput(f"header entry for tensor {name!r} is not an object", path=path)
        dtype = entry.get("dtype")
        dt = ST_DTYPES.get(dtype) if isinstance(dtype, str) else None
        if dt is None:
            raise CorruptInput(f"tensor {name!r} has unknown dtype {_gist(dtype)}", path=path,
                               hint="llmconv reads " + ", ".join(ST_DTYPES))
        shape = entry.get("shape")
        offs = entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise CorruptInput(f"tensor {name!r} has a malformed shape or data_offsets", path=path)
        if 0 not in shape:
            numel = 1
            for d in shape:  # stops early: the product of absurd dims would take long to compute
                numel *= d
                if numel > size:  # every dtype read here takes at least a byte per element
                    raise CorruptInput(f"tensor {name!r} has shape {_gist(shape)}: more elements than the "
                                       f"{size}-byte file holds", path=path)
        torch_shape = _torch_shape(dtype, shape)
        if torch_shape is None:
            raise CorruptInput(f"tensor {name!r} of {dtype} has shape {_gist(shape)}: its last dimension must hold "
                               f"a whole number of {dtype_name(dt)} elements ({_PACKED[dtype]} values each)", path=path)
        info = TensorInfo(name, dt, torch_shape)
        begin, end = offs
        if end - begin != info.nbytes or begin < 0:
            raise CorruptInput(f"tensor {name!r} claims bytes {_gist(begin, 24)}..{_gist(end, 24)} but shape "
                               f"{_gist(shape)} of {dtype_name(dt)} needs {_gist(info.nbytes, 24)}", path=path)
        if data_start + end > size:
            raise CorruptInput(f"tensor {name!r} runs past the end of the file (truncated?)", path=path)
        infos[name] = info
        offsets[name] = data_start + begin
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise CorruptInput(f"tensor {name!r} overlaps the tensor before it (data_offsets {begin}..{end})",
                               path=path)
        if begin > pos:
            raise CorruptInput(f"gap of {begin - pos} bytes before tensor {name!r}: offsets are not contiguous",
                               path=path)
        pos = end
    return infos, offsets, metadata


def open_file(path: Path) -> TensorSource:
    """Open one .safetensors file; tensors are views of a private mapping of it."""
    path = Path(path)
    try:
        header, data_start = _read_header(path)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from e
    infos, offsets, metadata = _validate(path, header, data_start)
    # Cross-check with the library's own reader, which is the reference for the format.
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptInput(f"safetensors refuses the file: {e}", path=path) from e
    if keys != set(infos):
        raise CorruptInput("header lists different tensors than the safetensors library reads", path=path)

    mm: mmap.mmap | None = None
    if path.stat().st_size > 0 and any(i.nbytes for i in infos.values()):
        with open(path, "rb") as fh:
            # ACCESS_COPY: a private mapping that torch may view as writable; the file is never changed.
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)

    def load(name: str) -> torch.Tensor:
        info = infos[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=offsets[name])
        return flat.view(info.shape)

    src = TensorSource(format="safetensors", path=path, infos=infos, loader=load, metadata=dict(metadata),
                       weights_format="safetensors", files=[path], zero_copy=True)
    return src


def _layout(src: TensorSource, names: list[str], metadata: dict[str, str]) -> tuple[list[str], bytes]:
    """The order ``names`` are written in and the padded header that lists them (the file is 8 bytes, the
    header, then the tensors' bytes)."""
    order = sorted(names, key=lambda n: (_LAYOUT_ORDER.get(ST_NAMES.get(src.infos[n].dtype, ""), -1), n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for n in order:
        info = src.infos[n]
        if info.dtype not in ST_NAMES:
            raise UsageError(f"tensor {n!r} has dtype {dtype_name(info.dtype)}, which safetensors cannot hold")
        header[n] = {"dtype": ST_NAMES[info.dtype], "shape": _header_shape(ST_NAMES[info.dtype], info.shape),
                     "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return order, raw + b" " * (-len(raw) % 8)


def file_size(src: TensorSource, names: list[str], metadata: dict[str, str]) -> int:
    """The size of the file :func:`write_file` writes for these arguments."""
    return 8 + len(_layout(src, names, metadata)[1]) + sum(src.infos[n].nbytes for n in names)


def write_file(src: TensorSource, names: list[str], dst: Path, *, metadata: dict[str, str],
               progress=None) -> None:
    """Stream ``names`` of ``src`` into one safetensors file at ``dst``; ``progress(n)`` gets every byte
    written, header included."""
    order, raw = _layout(src, names, metadata)
    with open_output(dst) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        if progress:
            progress(8 + len(raw))
        for n in order:
            t = src.tensor(n)
            info = src.infos[n]
            if tuple(t.shape) != info.shape or t.dtype != info.dtype:
                raise CorruptInput(f"tensor {n!r} reads as {dtype_name(t.dtype)}{list(t.shape)} but its header "
                                   f"says {dtype_name(info.dtype)}{list(info.shape)}", path=src.path)
            if info.nbytes:
                write_sliced(f, tensor_bytes(t))
            if progress:
                progress(info.nbytes)
            del t


def tensor_bytes(t: torch.Tensor):
    """The bytes of a tensor in row-major order, without a copy when it is already contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def default_metadata(src: TensorSource) -> dict[str, str]:
    """Carry the source's metadata, with the ``format: pt`` transformers requires to load it."""
    meta = dict(src.metadata)
    meta.setdefault("format", "pt")
    return meta


class SafetensorsFormat(Format):
    name = "safetensors"
    description = "safetensors file, or folder of shards with model.safetensors.index.json"
    extensions = (".safetensors",)

    def sniff(self, path: Path, head: bytes) -> bool:
        if path.is_dir():
            if (path / sharding.SAFETENSORS_INDEX).is_file():
                return True
            files = list(path.glob("*.safetensors"))
            return len(files) == 1 and not (path / "config.json").exists()
        if len(head) < 9:
            return False
        (n,) = struct.unpack("<Q", head[:8])
        return head[8:9] == b"{" and 2 <= n <= _MAX_HEADER

    def open(self, path: Path) -> TensorSource:
        if path.is_dir():
            index = path / sharding.SAFETENSORS_INDEX
            if index.is_file():
                return sharding.open_sharded(index, fmt="safetensors", open_shard=open_file)
            return open_file(next(path.glob("*.safetensors")))
        return open_file(path)

    def write(self, src: TensorSource, dst: Path, *, folder: bool, options: WriteOptions) -> list[Path]:
        names = src.canonical_names()
        metadata = default_metadata(src)
        if not folder:
            if options.shard_size and sum(src.infos[n].nbytes for n in names) > options.shard_size:
                raise UsageError("--shard-size needs a folder destination (the model is larger than one shard)",
                                 path=dst, hint="give a destination without the .safetensors extension")
            # dst is a temporary name: the caller's phase names the destination.
            with status.bytes(file_size(src, names, metadata), "bytes written", also=options.progress) as advance:
                write_file(src, names, dst, metadata=metadata, progress=advance)
            return [dst]
        shards = sharding.plan_shards(names, src.infos, options.shard_size)
        files = sharding.shard_names("model", ".safetensors", len(shards))
        written = []
        weight_map = {}
        total = sum(file_size(src, shard, metadata) for shard in shards)
        label = "bytes written" if len(files) == 1 else f"{len(files)} shards"
        with status.bytes(total, label, also=options.progress) as advance:
            for shard, fname in zip(shards, files, strict=True):
                write_file(src, shard, dst / fname, metadata=metadata, progress=advance)
                weight_map.update(dict.fromkeys(shard, fname))
                written.append(dst / fname)
        if len(shards) > 1:
            sharding.write_index(dst / sharding.SAFETENSORS_INDEX, weight_map,
                                 sum(src.infos[n].nbytes for n in names))
            written.append(dst / sharding.SAFETENSORS_INDEX)
        return written


FORMAT = register(SafetensorsFormat())
