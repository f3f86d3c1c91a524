"""PyTorch state dicts: a .bin/.pt/.pth file, or shards with ``pytorch_model.bin.index.json``.

Pickles are read with ``torch.load(weights_only=True)`` passed explicitly, so no environment
variable can turn the safe loader off, and memory-mapped (``mmap=True``) so that tensors stay in
the page cache. Writing hands ``torch.save`` tensors that are views of mapped files; tensors made
in memory (a cast) are first spilled one by one to a scratch file and mapped back, so peak memory
stays near one tensor.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import mmap
import os
import pickle
import re
import struct
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llmconv import progress as status
from llmconv.checkpoint import TensorInfo, TensorSource, dtype_name, find_aliases
from llmconv.errors import CorruptInput, InputError, UnsafeInput, Unsupported, UsageError
from llmconv.formats import sharding
from llmconv.formats.registry import Format, WriteOptions, register
from llmconv.formats.safetensors import tensor_bytes
from llmconv.io import SlicedWriter, human_size, open_output, scratch_dir, write_sliced

# Containers that training frameworks wrap around a state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# Legacy (pre-1.6, non-zip) pickles cannot be mapped: torch reads them whole into memory. Above this
# size they are refused rather than breaking the promise of bounded memory.
LEGACY_MAX_BYTES = 256 * 10**6
# What torch's loaders raise on bytes that are not a valid checkpoint (its weights-only unpickler
# pops empty stacks, unpacks short reads and asserts on storage keys).
_CORRUPT_ERRORS = (EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, AttributeError, TypeError,
                   IndexError, struct.error, AssertionError, RecursionError)
_CORRUPT_HINT = "the file is truncated or not a PyTorch checkpoint"
_RECORD_HINT = "torch.load refuses it too unless it maps the file; get the file again or re-save it with torch.save"


def _load(path: Path) -> tuple[object, bool]:
    """Load a state-dict file safely; also say whether its storages are mapped from a zip archive."""
    zipped = _is_zip(path)
    if path.name.endswith(".safetensors") or not zipped:
        # Legacy pickles cannot be mapped, and torch.load reads any path named *.safetensors as
        # safetensors (the content says PyTorch): both are read into memory.
        return _load_legacy(path, zipped=zipped), False
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; what matters is raised
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    except pickle.UnpicklingError as e:
        raise _refused(e, path) from None
    except RuntimeError as e:
        raise CorruptInput(f"torch.load cannot read it: {_first_line(e)}", path=path, hint=_CORRUPT_HINT) from None
    except _CORRUPT_ERRORS as e:
        raise CorruptInput(f"torch.load cannot read it: {_describe(e)}", path=path, hint=_CORRUPT_HINT) from None


def _is_zip(path: Path) -> bool:
    """Whether torch.load takes the file for a zip archive (it looks at the first bytes, as here)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from None


def _load_legacy(path: Path, *, zipped: bool) -> object:
    """Read into memory: legacy pickles cannot be mapped (nor can files torch would take for safetensors)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from None
    if size > LEGACY_MAX_BYTES and not zipped:
        raise Unsupported(f"legacy (non-zip) PyTorch pickle of {human_size(size)}, over the "
                          f"{human_size(LEGACY_MAX_BYTES)} llmconv reads: torch loads these whole into memory",
                          path=path,
                          hint="re-save it with torch.save(state_dict, path) from torch >= 1.6 (zip format) "
                               "or as safetensors, which are read a tensor at a time")
    try:
        with _Capped(path) as f, warnings.catch_warnings():
            if not zipped:
                problem = _legacy_problem(f, path)
                if problem is not None:
                    wanted = _pickle_globals(path)
                    raise _unsafe(wanted, path) if wanted else problem
                f.seek(0)
            warnings.simplefilter("ignore")
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(e, path) from None
    except (RuntimeError, *_CORRUPT_ERRORS) as e:
        raise CorruptInput(f"torch.load cannot read it: {_describe(e)}", path=path, hint=_CORRUPT_HINT) from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ENFORCE = re.compile(r"^\[enforce fail at [^\]]*\]\s*\.?\s*")
_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]*\w)")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _first_line(e: BaseException) -> str:
    """The gist of a torch error: its first sentence, without terminal colours or C++ source locations."""
    text = _ENFORCE.sub("", _ANSI.sub("", str(e)).strip())
    return text.splitlines()[0].split(". ")[0] if text else type(e).__name__


def _describe(e: BaseException) -> str:
    kind = "struct.error" if isinstance(e, struct.error) else type(e).__name__
    return f"{kind}: {_first_line(e)}" if str(e).strip() else kind


def _refused(e: pickle.UnpicklingError, path: Path) -> InputError:
    """Why the safe loader refused a pickle: unsafe when it asks for a global outside the allow-list
    (listed), corrupt otherwise (an unknown opcode, a stack that does not add up)."""
    wanted = _unsafe_globals(path)
    text = _ANSI.sub("", str(e))
    wanted = wanted or list(dict.fromkeys(_UNSUPPORTED_GLOBAL.findall(text)))
    if wanted:
        return _unsafe(wanted, path)
    # torch's message opens with advice to turn the safe loader off; the reason is on a later line.
    after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    reasons = [ln.strip() for ln in after.splitlines() if ln.strip()]
    why = re.split(r"\.\s+(?=[A-Z])", reasons[0])[0] if reasons else _first_line(e)
    return CorruptInput(f"not a valid pickle of tensors ({why})", path=path, hint=_CORRUPT_HINT)


def _unsafe(wanted: list[str], path: Path) -> UnsafeInput:
    return UnsafeInput(f"pickle needs more than plain tensors to load ({', '.join(wanted)}); nothing in it was run",
                       path=path, hint="only state dicts of tensors are read; re-save it with "
                                       "torch.save(model.state_dict()) or as safetensors")


def _unsafe_globals(path: Path) -> list[str]:
    if not zipfile.is_zipfile(path):
        return _pickle_globals(path)
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, pickle.UnpicklingError, *_CORRUPT_ERRORS):
        return []  # a listing failure must not hide the refusal itself


def _pickle_globals(path: Path) -> list[str]:
    """The globals a plain or legacy pickle names, read off its opcodes (nothing is unpickled).

    Returns:
        Those torch's safe loader would not allow, in order; empty if the stream cannot be read.
    """
    import pickletools

    safe = {f"{g.__module__}.{g.__qualname__}" for g in torch.serialization.get_safe_globals()
            if hasattr(g, "__qualname__")}
    found: dict[str, None] = {}
    try:
        with _Capped(path) as f:
            while f.peek(1):  # a legacy checkpoint is several pickles in a row
                strings: list[str] = []
                memo: dict[int, str] = {}
                for op, arg, _ in pickletools.genops(f):
                    if op.name in _STRING_OPS:
                        strings.append(str(arg))
                    elif op.name == "MEMOIZE" and strings:
                        memo[len(memo)] = strings[-1]
                    elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                        strings.append(memo[arg])
                    elif op.name == "GLOBAL":
                        found[str(arg).replace(" ", ".")] = None
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found[f"{strings[-2]}.{strings[-1]}"] = None
                if len(found) > 20:
                    break
    except (pickle.UnpicklingError, *_CORRUPT_ERRORS):
        pass  # the stream ends, or is not a pickle: what was found so far is the answer
    torch_ok = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")
    return [g for g in found if g not in safe and not g.startswith(torch_ok)]


class _Capped(io.BufferedReader):
    """A file whose reads stop at its end.

    ``BufferedReader.read(n)`` allocates ``n`` bytes before reading: a length field of a corrupt
    pickle must not make torch's unpickler (or pickletools) allocate what it claims.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.size = os.fstat(self.fileno()).st_size

    def read(self, n: int | None = -1) -> bytes:
        if n is not None and n > 0:
            n = min(n, max(0, self.size - self.tell()))
        return super().read(n)


def _find_state_dict(obj: object, is_tensor) -> dict | None:
    """The state dict in a loaded checkpoint: the object itself, or the first wrapper entry that is one."""
    if not isinstance(obj, dict):
        return None
    if all(is_tensor(v) for v in obj.values()):
        return obj
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(is_tensor(v) for v in inner.values()):
            return inner
    return None


def _state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    sd = _find_state_dict(obj, lambda v: isinstance(v, torch.Tensor))
    if sd is None and isinstance(obj, dict):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:3]
        raise Unsupported(f"not a state dict: entries {bad} are not tensors", path=path,
                          hint="save model.state_dict(), or a dict with a 'state_dict' entry")
    if sd is None:
        raise Unsupported(f"holds a {type(obj).__name__}, not a state dict of tensors", path=path)
    if not all(isinstance(k, str) for k in sd):
        raise Unsupported("state dict keys must be strings", path=path)
    return sd


def _check_view(name: str, t: torch.Tensor, path: Path) -> None:
    """Refuse a tensor whose view reaches past its storage or maps elements more than once.

    A state dict holds each element once; a stride-0 or overlapping view of a small storage would
    turn a few bytes into gigabytes on conversion.
    """
    if t.numel() == 0:
        return
    if any(st < 0 for st in t.stride()) or t.storage_offset() < 0:
        raise CorruptInput(f"tensor {name!r} has a negative stride or offset", path=path, hint=_CORRUPT_HINT)
    extent = _extent(t)
    last = t.storage_offset() + extent - 1
    held = t.untyped_storage().nbytes() // t.element_size() * _values_per_element(t.dtype)
    if last >= held:
        raise CorruptInput(f"tensor {name!r} reaches element {last} of a storage that holds {held}",
                           path=path, hint=_CORRUPT_HINT)
    if t.numel() > extent:
        raise CorruptInput(f"tensor {name!r} maps {t.numel()} elements onto {extent} stored ones "
                           f"(shape {list(t.shape)}, strides {list(t.stride())}); a state dict stores each "
                           "element once", path=path, hint="save a contiguous copy: tensor.contiguous()")
    if _maps_an_element_twice(t):
        raise CorruptInput(f"tensor {name!r} maps some of its elements onto the same stored element (shape "
                           f"{list(t.shape)}, strides {list(t.stride())}); a state dict stores each element once",
                           path=path, hint="save a contiguous copy: tensor.contiguous()")


def _maps_an_element_twice(t: torch.Tensor) -> bool:
    """Whether two indices of ``t`` reach the same element of its storage (shape [3, 3], strides [3, 3]).

    The usual layouts (contiguous, transposed, sliced) pass a quick test: with its dimensions ordered by stride,
    each stride steps past everything the smaller ones reach. Only a view that fails it has its offsets
    counted, which costs ``numel`` integers; ``numel`` is at most the storage's length (checked before).
    """
    reach = 0
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride(), strict=True) if n > 1):
        if stride <= reach:
            break
        reach += (size - 1) * stride
    else:
        return False
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride(), strict=True):
        offsets = (offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride)
    return int(torch.unique(offsets).numel()) < t.numel()


def _check_overlaps(sd: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse two tensors whose elements overlap, unless they are the same view (a tie).

    Tensors of a real state dict share a storage as one view under two names (tied weights) or as
    disjoint slices (q, k and v of a fused weight saved without a copy). Any other overlap stores an
    element once and writes it once per tensor: 100 overlapping views of a 4 MB storage would convert
    to 400 MB. Sorted by first byte, tensors whose byte ranges meet form clusters; a cluster of
    tensors dense in their range overlaps at once, one with gaps (a column slice) is checked element
    by element on a mask of its bytes.
    """
    spans: list[tuple[int, int, str, torch.Tensor]] = []
    views: set[tuple] = set()
    for name, t in sd.items():
        if t.numel() == 0:
            continue
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            continue  # a tie: find_aliases makes it an alias
        views.add(view)
        stored = -(-_extent(t) // _values_per_element(t.dtype))  # elements holding the tensor's values
        spans.append((t.data_ptr(), t.data_ptr() + stored * t.element_size(), name, t))
    spans.sort(key=lambda s: (s[0], s[1]))
    cluster: list[tuple[int, int, str, torch.Tensor]] = []
    reach = 0
    for span in spans:
        if cluster and span[0] < reach:
            cluster.append(span)
            reach = max(reach, span[1])
            continue
        _check_cluster(cluster, reach, path)
        cluster, reach = [span], span[1]
    _check_cluster(cluster, reach, path)


@functools.cache
def _values_per_element(dtype: torch.dtype) -> int:
    """How many values one stored element of ``dtype`` holds: more than one only for the sub-byte quantized
    dtypes (quint4x2, quint2x4), whose sizes and strides count values; asked of torch, which packs them."""
    if dtype not in _storable()[1]:
        return 1
    with warnings.catch_warnings():  # torch warns that quantized dtypes are deprecated
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.zeros(8), 1.0, 0, dtype)
    return max(1, 8 * q.element_size() // q.untyped_storage().nbytes())


def _extent(t: torch.Tensor) -> int:
    """How many elements lie between a tensor's first and last (inclusive)."""
    return 1 + sum((size - 1) * st for size, st in zip(t.shape, t.stride(), strict=True))


def _check_cluster(cluster: list[tuple[int, int, str, torch.Tensor]], reach: int, path: Path) -> None:
    if len(cluster) < 2:
        return
    # Packed values (quint4x2) have no byte of their own to mark: their ranges are taken as dense.
    if all(t.numel() == _extent(t) or _values_per_element(t.dtype) > 1 for *_, t in cluster):
        raise _overlap(cluster[0][2], cluster[1][2], path)  # the second starts inside the first
    base = cluster[0][0]
    mask = torch.zeros(reach - base, dtype=torch.bool)
    for i, (start, _, name, t) in enumerate(cluster):
        if _bytes_of(mask, start - base, t).any():
            fresh = torch.zeros_like(mask)
            _bytes_of(fresh, start - base, t).fill_(True)
            other = next(n for s, _, n, u in cluster[:i] if _bytes_of(fresh, s - base, u).any())
            raise _overlap(other, name, path)
        _bytes_of(mask, start - base, t).fill_(True)


def _bytes_of(mask: torch.Tensor, at: int, t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``'s elements as a view of ``mask``, whose byte ``at`` stands for ``t``'s first byte."""
    size = t.element_size()
    return mask.as_strided((*t.shape, size), (*(st * size for st in t.stride()), 1), at)


def _overlap(first: str, second: str, path: Path) -> CorruptInput:
    return CorruptInput(f"tensors {first!r} and {second!r} overlap in the storage they share; a state dict shares "
                       "storage only between tied names (one view) or disjoint slices, and converting would "
                       "write the shared elements once per tensor", path=path,
                       hint="save copies: torch.save({k: v.clone() for k, v in state_dict.items()}, path)")


# ---- what a checkpoint's pickle declares, read without building a tensor or calling anything ----

@dataclass(eq=False)
class _Storage:
    """A storage as the pickle declares it: its record key, element type and element count."""

    key: object
    dtype: torch.dtype
    numel: int
    untyped: bool = False  # torch.UntypedStorage, counted in bytes: the tensors on it carry their dtypes

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __setstate__(self, state: object) -> None:
        raise _Unmodelled("BUILD on a storage")  # a pickle must not re-declare what it declared


@dataclass(eq=False)
class _View:
    """A tensor as the pickle declares it: the arguments torch's ``_rebuild_tensor_v2`` would get, and the
    dtype ``_rebuild_tensor_v3`` gets (None: the storage's own)."""

    storage: object
    offset: object
    size: object
    stride: object
    dtype: object = None

    def __setstate__(self, state: object) -> None:
        raise _Unmodelled("BUILD on a tensor")


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype
    untyped: bool = False


class _Opaque:
    """Stands for any other global the pickle names: nothing real is looked up or called (whether it
    is allowed at all is torch's safe loader's decision, made on the same bytes)."""

    def __new__(cls, *args: object, **kwargs: object) -> _Opaque:
        return super().__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


class _Unmodelled(Exception):
    """The pickle uses something the structural reader does not model: it gives no verdict."""


class _Storages:
    """The storages one checkpoint's pickles declare, in order, and which one each key stands for."""

    def __init__(self, *, legacy: bool) -> None:
        self.legacy = legacy
        self.declared: list[_Storage] = []
        self.by_key: dict[object, _Storage] = {}

    def declare(self, key: object, dtype: torch.dtype, numel: int, *, untyped: bool = False) -> _Storage:
        # As torch.load: a zip checkpoint re-reads a key until it has loaded a storage with data (its
        # data pointer is null while it is empty); a legacy one keeps the first declaration of a key.
        if key in self.by_key:
            return self.by_key[key]
        st = _Storage(key, dtype, numel, untyped)
        self.declared.append(st)
        if self.legacy or st.nbytes > 0:
            self.by_key[key] = st
        return st


def _view(storage: object, offset: object, size: object, stride: object, *rest: object) -> _View:
    return _View(storage, offset, size, stride)


def _view_v3(storage: object, offset: object, size: object, stride: object, requires_grad: object = None,
             hooks: object = None, dtype: object = None, *rest: object) -> _View:
    # torch.save's form for the dtypes without a legacy storage class (float8, float4, uint16-64, ...): the
    # storage is untyped (counted in bytes) and the dtype comes along; offset and strides count elements.
    return _View(storage, offset, size, stride, dtype)


def _parameter(data: object, *rest: object) -> object:
    return data


_MODELLED = {("torch._utils", "_rebuild_tensor_v2"): _view, ("torch._utils", "_rebuild_tensor"): _view,
             ("torch._utils", "_rebuild_tensor_v3"): _view_v3,
             ("torch._utils", "_rebuild_parameter"): _parameter,
             ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
             ("collections", "OrderedDict"): collections.OrderedDict}
# What reading a damaged pickle can raise (pickle's pure-Python reader, over a capped file).
_PARSE_ERRORS = (pickle.UnpicklingError, _Unmodelled, OverflowError, *_CORRUPT_ERRORS)


@functools.cache
def _torch_globals() -> dict[str, object]:
    """What ``torch.load(weights_only=True)`` resolves each global it allows to, by ``module.name``: its own
    allow-list, so that storage classes and dtypes are named here as torch names them."""
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())


class _StructureReader(pickle._Unpickler):
    """Reads the storages and tensor views a torch pickle declares.

    The pure-Python unpickler: its reads go through ``read(n)`` of a capped file or a BytesIO, so a
    lying length field cannot make it allocate (the C one allocates the length first).
    """

    def __init__(self, f: io.IOBase, table: _Storages) -> None:
        super().__init__(f, encoding="utf-8")  # torch.load's default
        self.table = table

    def find_class(self, module: str, name: str) -> object:
        # Storage classes and dtypes as torch's safe loader takes them (its allow-list, by the same name).
        real = _torch_globals().get(f"{module}.{name}")
        if real is torch.UntypedStorage or (module, name) == ("torch", "UntypedStorage"):
            return _StorageType(torch.uint8, untyped=True)
        if isinstance(real, torch.serialization.StorageType):
            return _StorageType(real.dtype)
        if isinstance(real, torch.dtype):
            return real  # a value, not a callable: nothing runs
        return _MODELLED.get((module, name), _Opaque)

    def persistent_load(self, pid: object) -> _Storage:
        # zip: ('storage', type, key, location, numel); legacy adds a view of another storage (or None)
        if not (isinstance(pid, tuple) and len(pid) == (6 if self.table.legacy else 5)):
            raise _Unmodelled("persistent id")
        kind, stype, key, _location, numel = pid[:5]
        if kind not in ("storage", b"storage") or (self.table.legacy and pid[5] is not None):
            raise _Unmodelled("persistent id")
        if not isinstance(stype, _StorageType) or type(numel) is not int or not isinstance(key, str | int | bytes):
            raise _Unmodelled("storage")
        return self.table.declare(key, stype.dtype, numel, untyped=stype.untyped)


def _declared_views(obj: object) -> dict[str, _View]:
    """The tensors of the state dict the pickle declares (the one ``_state_dict`` picks), by name."""
    sd = _find_state_dict(obj, lambda v: isinstance(v, _View | _Opaque))
    return {k: v for k, v in (sd or {}).items() if isinstance(k, str) and isinstance(v, _View)}


def _first_users(views: dict[str, _View]) -> dict[int, str]:
    users: dict[int, str] = {}
    for name, v in views.items():
        users.setdefault(id(v.storage), name)
    return users


def _label(st: _Storage, users: dict[int, str]) -> str:
    name = users.get(id(st))
    return f"tensor {name!r}" if name is not None else f"storage {str(st.key)!r}"


def _check_declared_views(views: dict[str, _View], path: Path) -> None:
    """Refuse views as declared that are negative (torch quietly re-strides an empty tensor) or reach past
    their storage (torch grows a legacy storage to fit a view before it reads the storage's bytes)."""
    for name, v in views.items():
        if not (isinstance(v.size, tuple | list) and isinstance(v.stride, tuple | list)
                and all(isinstance(x, int) for x in (v.offset, *v.size, *v.stride))):
            continue  # not what torch.save writes; torch's own rebuild decides
        st = v.storage
        if min((v.offset, *v.size, *v.stride)) < 0 or (isinstance(st, _Storage) and st.numel < 0):
            numel = f", storage of {st.numel} elements" if isinstance(st, _Storage) and st.numel < 0 else ""
            raise CorruptInput(f"tensor {name!r} has a negative size, stride or offset (size {list(v.size)}, "
                               f"stride {list(v.stride)}, offset {v.offset}{numel})", path=path, hint=_CORRUPT_HINT)
        if not isinstance(st, _Storage) or 0 in v.size:
            continue
        dtype = st.dtype if v.dtype is None else v.dtype
        if not isinstance(dtype, torch.dtype):
            continue  # not a dtype torch's safe loader knows: it refuses the file itself
        # A v3 view of an untyped storage counts its elements in its own dtype, the storage in bytes.
        held = st.nbytes // dtype.itemsize
        last = v.offset + sum((n - 1) * s for n, s in zip(v.size, v.stride, strict=False))
        if last >= held:
            raise CorruptInput(f"tensor {name!r} reaches element {last} of a storage that holds {held}",
                               path=path, hint=_CORRUPT_HINT)


def _legacy_problem(f: _Capped, path: Path) -> InputError | None:
    """What is provably wrong with a legacy checkpoint, found before torch allocates its storages.

    The layout: pickles of the magic number, protocol and system info, the state dict, the list of
    storage keys; then per key its element count (8 bytes) and its bytes. torch allocates each
    storage at its declared size while unpickling, and takes a count that differs as the size.
    """
    size = f.size
    table = _Storages(legacy=True)
    obj = keys = None
    with contextlib.suppress(*_PARSE_ERRORS):  # a pickle that cannot be read: torch.load says why
        for _ in range(3):
            _StructureReader(f, table).load()
        obj = _StructureReader(f, table).load()
        keys = _StructureReader(f, table).load()
    views = _declared_views(obj)
    users = _first_users(views)
    for name, v in views.items():
        if isinstance(v.storage, _Storage) and v.storage.untyped:
            # torch.save writes the dtypes without a legacy storage class (float8, uint16, ...) this way
            # when asked for the legacy format, but torch.load reads no untyped storage from one.
            what = dtype_name(v.dtype) if isinstance(v.dtype, torch.dtype) else "untyped"
            return Unsupported(f"tensor {name!r} ({what}) is stored in the legacy (non-zip) format, from which "
                               "torch.load cannot read it back", path=path,
                               hint="save it again with torch.save's default (zip) format, or as safetensors")
    total = 0
    for st in table.declared:
        total += max(0, st.nbytes)
        if st.nbytes > size:
            return CorruptInput(f"{_label(st, users)}: its storage declares {st.nbytes} bytes, more than the whole "
                                f"file holds ({size})", path=path, hint=_CORRUPT_HINT)
        if total > size:
            return CorruptInput(f"{_label(st, users)}: with its storage the pickle declares {total} bytes, more "
                                f"than the whole file holds ({size})", path=path, hint=_CORRUPT_HINT)
    try:
        _check_declared_views(views, path)
    except CorruptInput as e:
        return e
    if not isinstance(keys, list):
        return None
    for key in keys:
        st = table.by_key.get(key) if isinstance(key, str | int | bytes) else None
        if st is None:
            return None  # torch names the key no storage has
        label = _label(st, users)
        raw = f.read(8)
        if len(raw) < 8:
            return CorruptInput(f"{label}: the file ends before storage {str(key)!r}'s element count", path=path,
                                hint=_CORRUPT_HINT)
        (count,) = struct.unpack("<q", raw)
        if count != st.numel:
            return CorruptInput(f"{label}: storage {str(key)!r} counts {count} elements, the pickle says "
                                f"{st.numel}", path=path, hint=_CORRUPT_HINT)
        end = f.tell() + st.nbytes
        if end > size:
            return CorruptInput(f"{label}: storage {str(key)!r} ({st.nbytes} bytes) runs past the end of the file",
                                path=path, hint=_CORRUPT_HINT)
        f.seek(end)
    return None


def _check_zip(path: Path) -> None:
    """Refuse a zip checkpoint whose records are not exactly the storages its pickle declares.

    torch.load(mmap=True) maps each storage at its record's offset for the size the pickle declares,
    without comparing it to the record: a short record would read the next zip header as weights. The
    rule is torch's own when it reads without mmap: each declared storage's record ``data/<key>``
    exists, is stored as is, and holds exactly numel * itemsize bytes. Two members of one name are
    refused: which of them a reader takes is not defined.
    """
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if not infos:
                raise CorruptInput("the zip archive is empty", path=path, hint=_CORRUPT_HINT)
            # torch's reader takes the folder of the archive's first member as the checkpoint's
            prefix = infos[0].filename.split("/", 1)[0] + "/"
            twice = sorted(n for n, c in collections.Counter(i.filename for i in infos).items() if c > 1)
            for name in twice:
                if not name.startswith(prefix + "data/"):
                    raise _twice(name, None, path)
            pkl = z.read(prefix + "data.pkl")
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, *_CORRUPT_ERRORS) as e:
        raise CorruptInput(f"not a readable zip archive ({_describe(e)})", path=path, hint=_CORRUPT_HINT) from None
    table = _Storages(legacy=False)
    try:
        obj = _StructureReader(io.BytesIO(pkl), table).load()
    except _PARSE_ERRORS as e:
        raise Unsupported(f"llmconv cannot list the storages data.pkl declares ({_describe(e)}), so it cannot "
                          "check them against their records", path=path,
                          hint="re-save it with torch.save(model.state_dict()) or as safetensors") from None
    views = _declared_views(obj)
    _check_declared_views(views, path)
    users = _first_users(views)
    members = {i.filename: i for i in infos}
    for st in table.declared:
        rel = f"data/{st.key}"
        info = members.get(prefix + rel)
        if prefix + rel in twice:
            raise _twice(rel, _label(st, users), path)
        if info is None:
            raise CorruptInput(f"{_label(st, users)}: its storage record {rel!r} is missing", path=path,
                               hint=_RECORD_HINT)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptInput(f"{_label(st, users)}: record {rel!r} is compressed; torch maps tensor data stored "
                               "as is", path=path, hint="re-save it with torch.save")
        if info.file_size != st.nbytes:
            raise CorruptInput(f"{_label(st, users)} needs {st.nbytes} bytes of storage but its record {rel!r} "
                               f"holds {info.file_size}", path=path, hint=_RECORD_HINT)
    if twice:
        raise _twice(twice[0], None, path)


def _twice(name: str, who: str | None, path: Path) -> CorruptInput:
    what = f"{who}: its record {name!r} is" if who else f"record {name!r} is"
    return CorruptInput(f"{what} in the archive twice; which copy a reader takes is not defined", path=path,
                        hint="re-save it with torch.save")


def open_file(path: Path) -> TensorSource:
    """Open one state-dict file (zip or legacy pickle) without running any code in it."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path=path)
    obj, mapped = _load(path)
    sd = _state_dict(obj, path)
    infos = {}
    for n, t in sd.items():
        if t.is_sparse or t.layout != torch.strided:
            raise Unsupported(f"tensor {n!r} has layout {t.layout}; only dense tensors are handled", path=path)
        _check_view(n, t, path)
        infos[n] = TensorInfo(n, t.dtype, tuple(t.shape))
    if mapped:
        _check_zip(path)
    _check_overlaps(sd, path)
    aliases = find_aliases(sd.items())

    def load(name: str) -> torch.Tensor:
        return sd[name].detach()

    return TensorSource(format="pytorch", path=path, infos=infos, loader=load, aliases=aliases,
                        weights_format="pytorch", files=[path], zero_copy=True)


@contextlib.contextmanager
def _watch_size(path: Path, progress, limit: int):
    """Report a growing file's size to ``progress``, up to ``limit``, while torch.save writes it in one call."""
    seen = [0]
    if progress is None:
        yield seen
        return
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.2):
            with contextlib.suppress(OSError):
                size = min(path.stat().st_size, limit)  # the zip's own records are not counted
                if size > seen[0]:
                    progress(size - seen[0])
                    seen[0] = size

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        yield seen
    finally:
        done.set()
        th.join()


@functools.cache
def _storable() -> tuple[frozenset[torch.dtype], frozenset[torch.dtype]]:
    """The dtypes a state dict holds: those ``torch.save`` stores in a form ``torch.load(weights_only=True)``
    reads back; and of those, the quantized ones.

    Both sides are torch's own rules: torch.save stores the dtypes of ``torch.storage._new_dtypes()`` as an
    untyped storage plus the dtype (``_rebuild_tensor_v3``), the others as the legacy storage class
    ``_dtype_to_storage_type_map()`` names; the safe loader must allow each of those globals.
    """
    allowed = _torch_globals()
    legacy = torch.storage._dtype_to_storage_type_map()
    v3 = torch.storage._new_dtypes()
    v3_ok = "torch._utils._rebuild_tensor_v3" in allowed and allowed.get("torch.storage.UntypedStorage") is not None

    def reads_back(d: torch.dtype) -> bool:
        if d in v3:
            return v3_ok and allowed.get(str(d)) is d
        return d in legacy and f"torch.{legacy[d]}" in allowed

    storable = frozenset(v for v in vars(torch).values() if isinstance(v, torch.dtype) and reads_back(v))
    with warnings.catch_warnings():  # torch warns that quantized dtypes are deprecated
        warnings.simplefilter("ignore")
        quantized = frozenset(d for d in storable if torch.empty(0, dtype=d).is_quantized)
    return storable, quantized


def _check_storable(src: TensorSource, names: list[str], dst: Path) -> None:
    storable, quantized = _storable()
    for n in names:
        dtype = src.infos[n].dtype
        if dtype not in storable:
            known = ", ".join(sorted(dtype_name(d) for d in storable - quantized))
            raise Unsupported(f"tensor {n!r} has dtype {dtype_name(dtype)}, which a PyTorch state dict cannot hold: "
                              "torch.save has no form of it that torch.load(weights_only=True) reads back",
                              path=dst, hint=f"cast it to one of: {known}")


def _quantized(name: str, t: torch.Tensor, dst: Path) -> torch.Tensor:
    """A tensor of a quantized dtype is stored with its quantizer (scale, zero point): bare bytes are not enough."""
    if t.dtype in _storable()[1] and not t.is_quantized:
        raise Unsupported(f"tensor {name!r} has dtype {dtype_name(t.dtype)} but no quantizer (scale and zero "
                          "point), so torch.save cannot store it", path=dst,
                          hint="dequantize it first, or convert from the quantized PyTorch checkpoint itself")
    return t


def write_file(src: TensorSource, names: list[str], dst: Path, *, progress=None) -> None:
    """Write ``names`` (aliases included, sharing storage) as one zip state dict at ``dst``.

    Raises:
        Unsupported: a tensor's dtype has no form ``torch.load(weights_only=True)`` reads (named, with its dtype).
    """
    _check_storable(src, names, dst)
    total = sum(src.infos[n].nbytes for n in names if n not in src.aliases)
    with contextlib.ExitStack() as stack:
        if src.zero_copy:
            canon = {n: _quantized(n, src.tensor(n), dst) for n in names if n not in src.aliases}
        else:
            canon = _spill(src, [n for n in names if n not in src.aliases], dst, stack)
        state = {}
        for n in names:
            c = src.aliases.get(n, n)
            state[n] = canon[c] if c in canon else src.tensor(n)
        # An open file object (not a path) keeps the archive's inner folder name fixed ("archive"),
        # so the output does not depend on the temporary file name: conversions are deterministic.
        with open_output(dst) as f, _watch_size(dst, progress, total) as seen:
            _save(state, SlicedWriter(f))
        if progress:
            progress(max(0, total - seen[0]))


def _save(state: dict[str, torch.Tensor], f: SlicedWriter) -> None:
    """torch.save, re-raising what interrupted its writes as itself.

    torch's zip writer calls our ``write`` from C++ and turns whatever it raised (ENOSPC, EFBIG, a
    Ctrl-C) into "RuntimeError: ... unexpected pos", keeping the original only as ``__context__``.
    """
    try:
        torch.save(state, f)
    except RuntimeError as e:
        cause = e.__context__
        if isinstance(cause, OSError) or (isinstance(cause, BaseException) and not isinstance(cause, Exception)):
            raise cause from None
        raise


def _spill(src: TensorSource, names: list[str], near: Path, stack: contextlib.ExitStack) -> dict[str, torch.Tensor]:
    """Write tensors one at a time to a scratch file and map them back (bounded memory)."""
    tmpdir = Path(stack.enter_context(scratch_dir(near)))
    spill = tmpdir / "spill.bin"
    offsets: dict[str, int] = {}
    kept: dict[str, torch.Tensor] = {}
    quantized = _storable()[1]
    with open(spill, "wb") as f:
        pos = 0
        for n in names:
            t = src.tensor(n)
            if t.dtype in quantized:
                kept[n] = _quantized(n, t, near)  # its quantizer goes with it; it cannot be mapped back from bytes
                continue
            pad = -pos % 64
            f.write(b"\0" * pad)
            pos += pad
            offsets[n] = pos
            if t.numel():
                pos += write_sliced(f, tensor_bytes(t))
            del t
        f.write(b"\0" * 64)
    fh = stack.enter_context(open(spill, "rb"))  # noqa: SIM115 - closed by the ExitStack
    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for n in names:
        info = src.infos[n]
        if n in kept:
            out[n] = kept[n]
        elif info.numel == 0:
            out[n] = torch.empty(info.shape, dtype=info.dtype)
        else:
            out[n] = torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=offsets[n]).view(info.shape)
    return out


class PytorchFormat(Format):
    name = "pytorch"
    description = "PyTorch state dict (.bin/.pt/.pth), or folder of shards with pytorch_model.bin.index.json"
    extensions = (".bin", ".pt", ".pth")

    def sniff(self, path: Path, head: bytes) -> bool:
        if path.is_dir():
            if (path / sharding.PYTORCH_INDEX).is_file():
                return True
            files = [p for ext in self.extensions for p in path.glob(f"*{ext}")]
            return len(files) == 1 and not (path / "config.json").exists() and not list(path.glob("*.safetensors"))
        # A zip archive (torch >= 1.6) or a pickle stream (legacy torch.save).
        return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"

    def open(self, path: Path) -> TensorSource:
        if path.is_dir():
            index = path / sharding.PYTORCH_INDEX
            if index.is_file():
                return sharding.open_sharded(index, fmt="pytorch", open_shard=open_file)
            files = [p for ext in self.extensions for p in path.glob(f"*{ext}")]
            return open_file(files[0])
        return open_file(path)

    def write(self, src: TensorSource, dst: Path, *, folder: bool, options: WriteOptions) -> list[Path]:
        names = src.names()
        if not folder:
            if options.shard_size and src.total_bytes > options.shard_size:
                raise UsageError("--shard-size needs a folder destination (the model is larger than one shard)",
                                 path=dst, hint="give a destination without the .bin extension")
            # The count is the tensors' bytes: the zip's records around them are not known before torch.save.
            with status.bytes(src.total_bytes, "bytes written", also=options.progress) as advance:
                write_file(src, names, dst, progress=advance)
            return [dst]
        canonical = src.canonical_names()
        shards = sharding.plan_shards(canonical, src.infos, options.shard_size)
        # A tied alias is stored in its canonical tensor's shard, so the two still share storage.
        where = {n: i for i, shard in enumerate(shards) for n in shard}
        for alias, canon in src.aliases.items():
            if canon in where:
                shards[where[canon]].append(alias)
        files = sharding.shard_names("pytorch_model", ".bin", len(shards))
        written = []
        weight_map = {}
        label = "bytes written" if len(files) == 1 else f"{len(files)} shards"
        with status.bytes(src.total_bytes, label, also=options.progress) as advance:
            for shard, fname in zip(shards, files, strict=True):
                write_file(src, shard, dst / fname, progress=advance)
                weight_map.update(dict.fromkeys(shard, fname))
                written.append(dst / fname)
        if len(shards) > 1:
            sharding.write_index(dst / sharding.PYTORCH_INDEX, weight_map, src.total_bytes)
            written.append(dst / sharding.PYTORCH_INDEX)
        return written


FORMAT = register(PytorchFormat())
