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
from llmconv.io import SlicedWriter, open_output, scratch_dir, write_sliced

# Containers that training frameworks wrap around a state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


def _load(path: Path) -> object:
    if path.name.endswith(".safetensors"):
        # torch.load reads any path named *.safetensors as safetensors; the content says PyTorch.
        return _load_legacy(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; what matters is raised
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise _refused(e, path) from None
    except RuntimeError as e:
        text = str(e)
        if "mmap" in text and "zipfile" in text.lower():
            # The legacy (pre-1.6) format cannot be mapped: it is read into memory instead.
            return _load_legacy(path)
        raise CorruptInput(f"torch.load cannot read it: {_first_line(e)}", path=path,
                           hint="the file is truncated or not a PyTorch checkpoint") from None
    except (EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, AttributeError, TypeError, IndexError) as e:
        raise CorruptInput(f"torch.load cannot read it: {_describe(e)}",
                           path=path, hint="the file is truncated or not a PyTorch checkpoint") from None


def _load_legacy(path: Path) -> object:
    """Read into memory: legacy pickles cannot be mapped (nor can files torch would take for safetensors)."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(e, path) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, TypeError, IndexError) as e:
        raise CorruptInput(f"torch.load cannot read it: {_describe(e)}", path=path,
                           hint="the file is truncated or not a PyTorch checkpoint") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ENFORCE = re.compile(r"^\[enforce fail at [^\]]*\]\s*\.?\s*")
_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]*\w)")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _first_line(e: BaseException) -> str:
    """The gist of a torch error: its first sentence, without terminal colours or C++ source locations."""
    text = _ENFORCE.sub("", _ANSI.sub("", str(e)).strip())
    return text.splitlines()[0].split(". ")[0] if text else type(e).__name__


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {_first_line(e)}" if str(e).strip() else type(e).__name__


def _refused(e: pickle.UnpicklingError, path: Path) -> UnsafeInput:
    """The refusal of a pickle that weights_only=True will not load, listing what it wanted."""
    wanted = _unsafe_globals(path)  # zip checkpoints only
    text = _ANSI.sub("", str(e))
    wanted = wanted or list(dict.fromkeys(_UNSUPPORTED_GLOBAL.findall(text)))
    if wanted:
        why = ", ".join(wanted)
    else:
        # torch's message opens with advice to turn the safe loader off; the reason is on a later line.
        after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
        reasons = [ln.strip() for ln in after.splitlines() if ln.strip()]
        why = re.split(r"\.\s+(?=[A-Z])", reasons[0])[0] if reasons else _first_line(e)
    return UnsafeInput(f"pickle needs more than plain tensors to load ({why}); nothing in it was run",
                       path=path, hint="only state dicts of tensors are read; re-save it with "
                                       "torch.save(model.state_dict()) or as safetensors")


def _unsafe_globals(path: Path) -> list[str]:
    if not zipfile.is_zipfile(path):
        return _pickle_globals(path)
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError, zipfile.BadZipFile):
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
        with open(path, "rb") as f:
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
    except (ValueError, OSError, EOFError, pickle.UnpicklingError):
        pass  # the stream ends, or is not a pickle: what was found so far is the answer
    torch_ok = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")
    return [g for g in found if g not in safe and not g.startswith(torch_ok)]


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


def open_file(path: Path) -> TensorSource:
    """Open one state-dict file (zip or legacy pickle) without running any code in it."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path=path)
    sd = _state_dict(_load(path), path)
    infos = {}
    for n, t in sd.items():
        if t.is_sparse or t.layout != torch.strided:
            raise Unsupported(f"tensor {n!r} has layout {t.layout}; only dense tensors are handled", path=path)
        infos[n] = TensorInfo(n, t.dtype, tuple(t.shape))
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
            torch.save(state, SlicedWriter(f))
        if progress:
            progress(max(0, total - seen[0]))


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
