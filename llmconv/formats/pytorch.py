"""PyTorch state dicts: a .bin/.pt/.pth file, or shards with ``pytorch_model.bin.index.json``.

Pickles are read with ``torch.load(weights_only=True)`` passed explicitly, so no environment
variable can turn the safe loader off, and memory-mapped (``mmap=True``) so that tensors stay in
the page cache. Writing hands ``torch.save`` tensors that are views of mapped files; tensors made
in memory (a cast) are first spilled one by one to a scratch file and mapped back, so peak memory
stays near one tensor.
"""

from __future__ import annotations

import contextlib
import mmap
import pickle
import re
import struct
import threading
import warnings
import zipfile
from pathlib import Path

import torch

from llmconv.checkpoint import TensorInfo, TensorSource, find_aliases
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


def _load(path: Path) -> tuple[object, bool]:
    """Load a state-dict file safely; also say whether its storages are mapped from a zip archive."""
    if path.name.endswith(".safetensors"):
        # torch.load reads any path named *.safetensors as safetensors; the content says PyTorch.
        return _load_legacy(path), False
    if not _is_zip(path):
        return _load_legacy(path), False
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


def _load_legacy(path: Path) -> object:
    """Read into memory: legacy pickles cannot be mapped (nor can files torch would take for safetensors)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from None
    if size > LEGACY_MAX_BYTES and not _is_zip(path):
        raise Unsupported(f"legacy (non-zip) PyTorch pickle of {human_size(size)}, over the "
                          f"{human_size(LEGACY_MAX_BYTES)} llmconv reads: torch loads these whole into memory",
                          path=path,
                          hint="re-save it with torch.save(state_dict, path) from torch >= 1.6 (zip format) "
                               "or as safetensors, which are read a tensor at a time")
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
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
        return UnsafeInput(f"pickle needs more than plain tensors to load ({', '.join(wanted)}); nothing in it was run",
                           path=path, hint="only state dicts of tensors are read; re-save it with "
                                           "torch.save(model.state_dict()) or as safetensors")
    # torch's message opens with advice to turn the safe loader off; the reason is on a later line.
    after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    reasons = [ln.strip() for ln in after.splitlines() if ln.strip()]
    why = re.split(r"\.\s+(?=[A-Z])", reasons[0])[0] if reasons else _first_line(e)
    return CorruptInput(f"not a valid pickle of tensors ({why})", path=path, hint=_CORRUPT_HINT)


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
        with open(path, "rb") as raw:
            f = _Capped(raw, raw.seek(0, 2))
            raw.seek(0)
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


class _Capped:
    """A file whose reads stop at its end: a length field of a corrupt pickle must not make
    pickletools allocate what it claims."""

    def __init__(self, f, size: int) -> None:
        self._f, self._size = f, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._size - self._f.tell())
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._f.readline()

    def peek(self, n: int) -> bytes:
        return self._f.peek(n)

    def tell(self) -> int:
        return self._f.tell()


def _state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:3]
        raise Unsupported(f"not a state dict: entries {bad} are not tensors", path=path,
                          hint="save model.state_dict(), or a dict with a 'state_dict' entry")
    if not isinstance(obj, dict):
        raise Unsupported(f"holds a {type(obj).__name__}, not a state dict of tensors", path=path)
    if not all(isinstance(k, str) for k in obj):
        raise Unsupported("state dict keys must be strings", path=path)
    return obj


def _check_view(name: str, t: torch.Tensor, path: Path) -> None:
    """Refuse a tensor whose view reaches past its storage or maps elements more than once.

    A state dict holds each element once; a stride-0 or overlapping view of a small storage would
    turn a few bytes into gigabytes on conversion.
    """
    if t.numel() == 0:
        return
    if any(st < 0 for st in t.stride()) or t.storage_offset() < 0:
        raise CorruptInput(f"tensor {name!r} has a negative stride or offset", path=path, hint=_CORRUPT_HINT)
    first = t.storage_offset()
    last = first + sum((size - 1) * st for size, st in zip(t.shape, t.stride(), strict=True))
    held = t.untyped_storage().nbytes() // t.element_size()
    if last >= held:
        raise CorruptInput(f"tensor {name!r} reaches element {last} of a storage that holds {held}",
                           path=path, hint=_CORRUPT_HINT)
    if t.numel() > last - first + 1:
        raise CorruptInput(f"tensor {name!r} maps {t.numel()} elements onto {last - first + 1} stored ones "
                           f"(shape {list(t.shape)}, strides {list(t.stride())}); a state dict stores each "
                           "element once", path=path, hint="save a contiguous copy: tensor.contiguous()")


def _check_records(sd: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse storages that need more bytes than their zip record holds (or records stored compressed).

    torch.load(mmap=True) maps each storage at its record's offset for the size the pickle claims,
    without comparing it to the record: a short record would read the next zip header as weights.
    """
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            rel = info.filename.split("/", 1)[-1]
            if rel.startswith("data/") and info.compress_type != zipfile.ZIP_STORED:
                raise CorruptInput(f"record {rel!r} is compressed; torch maps tensor data stored as is",
                                   path=path, hint="re-save it with torch.save")
    reader = torch._C.PyTorchFileReader(str(path))
    records = {}
    for rel in reader.get_all_records():
        if rel.startswith("data/"):
            records[reader.get_record_offset(rel)] = (rel, reader.get_record_size(rel))
    storages: dict[int, tuple[int, str]] = {}  # data pointer -> (bytes, first tensor that uses it)
    for name, t in sd.items():
        s = t.untyped_storage()
        if s.data_ptr():
            storages.setdefault(s.data_ptr(), (s.nbytes(), name))
    if not storages:
        return
    # The mapping's base address: the one that puts every storage at the start of a record (unique
    # when every record is used, as torch.save writes them; otherwise each candidate must hold).
    low = min(storages)
    bases = [low - off for off in sorted(records)
             if all(ptr - (low - off) in records for ptr in storages)]
    if not bases:
        name = storages[low][1]
        raise CorruptInput(f"the storage of tensor {name!r} does not start at a data record", path=path,
                           hint=_CORRUPT_HINT)
    for base in bases:
        for ptr, (nbytes, name) in storages.items():
            rel, size = records[ptr - base]
            if nbytes > size:
                raise CorruptInput(f"tensor {name!r} needs {nbytes} bytes of storage but its record {rel!r} "
                                   f"holds {size}", path=path, hint=_CORRUPT_HINT)


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
        _check_records(sd, path)
    aliases = find_aliases(sd.items())

    def load(name: str) -> torch.Tensor:
        return sd[name].detach()

    return TensorSource(format="pytorch", path=path, infos=infos, loader=load, aliases=aliases,
                        weights_format="pytorch", files=[path], zero_copy=True)


@contextlib.contextmanager
def _watch_size(path: Path, progress):
    """Report a growing file's size to ``progress`` while torch.save writes it in one call."""
    seen = [0]
    if progress is None:
        yield seen
        return
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.2):
            with contextlib.suppress(OSError):
                size = path.stat().st_size
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


def write_file(src: TensorSource, names: list[str], dst: Path, *, progress=None) -> None:
    """Write ``names`` (aliases included, sharing storage) as one zip state dict at ``dst``."""
    total = sum(src.infos[n].nbytes for n in names if n not in src.aliases)
    with contextlib.ExitStack() as stack:
        if src.zero_copy:
            canon = {n: src.tensor(n) for n in names if n not in src.aliases}
        else:
            canon = _spill(src, [n for n in names if n not in src.aliases], dst, stack)
        state = {}
        for n in names:
            c = src.aliases.get(n, n)
            state[n] = canon[c] if c in canon else src.tensor(n)
        # An open file object (not a path) keeps the archive's inner folder name fixed ("archive"),
        # so the output does not depend on the temporary file name: conversions are deterministic.
        with open_output(dst) as f, _watch_size(dst, progress) as seen:
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
    with open(spill, "wb") as f:
        pos = 0
        for n in names:
            t = src.tensor(n)
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
        if info.numel == 0:
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
            write_file(src, names, dst, progress=options.progress)
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
        for shard, fname in zip(shards, files, strict=True):
            write_file(src, shard, dst / fname, progress=options.progress)
            weight_map.update(dict.fromkeys(shard, fname))
            written.append(dst / fname)
        if len(shards) > 1:
            sharding.write_index(dst / sharding.PYTORCH_INDEX, weight_map, src.total_bytes)
            written.append(dst / sharding.PYTORCH_INDEX)
        return written


FORMAT = register(PytorchFormat())
