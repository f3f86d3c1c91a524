"""Run one fuzz case through the real CLI (in-process) and judge it against the reference libraries.

Per case the CLI runs ``inspect PATH --json`` and ``convert PATH DST --json`` (verification on), and
for ONNX ``verify SEED PATH --mode weights --json`` too. The contract each run must keep:

* exit 0, 1 (verify only, when the weights really differ) or 2; never 3, another code, an exception
  escaping the command (a traceback), a timeout, or memory growth past the bound;
* on exit 2 one line on stderr and no traceback; with ``--json`` one JSON object on stdout;
* on exit 0 the answer equals what the reference library reads (safetensors.safe_open,
  torch.load(weights_only=True), onnx.numpy_helper) tensor by tensor, and the input is one the
  reference accepts: sound (no storage record shorter than its tensors, no view past its storage,
  no duplicate or sparse initializers) and safe (no path leaving the model's folder);
* on a non-zero exit nothing at DST; never ``.llmconv-*`` leftovers, a changed input, the fake
  secret (or a link) in the output, or a model folder's code run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import resource
import shutil
import signal
import struct
import threading
import time
import traceback
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzz_corpus import CODE_RAN_MARKER, FAKE_SECRET, MODEL_DIR, SEEDS

# Severity order: a case's class is its first finding in this list.
FINDINGS = ("traceback", "exit3", "other-exit", "timeout", "memory", "code-ran", "leak", "accepted-unsafe",
            "exit0-mismatch", "exit0-dropped", "accepted-corrupt", "exit1-corrupt", "verify-wrong", "leftover",
            "input-modified", "bad-stderr", "bad-json")
OK_CLASSES = ("ok0", "ok1", "ok2")
MEMORY_BOUND_MB = 256  # growth of peak RSS allowed for one command on an input of < 100 KB
MEMORY_CAP_MB = 3072  # address space a command may add before allocations fail (protects the machine)


class CaseTimeout(BaseException):
    """Raised by the alarm inside a command that ran past its time (BaseException: nothing may catch it)."""


class Refuse(Exception):
    """The reference says this input must be refused: ``why`` is ``unsafe`` or ``corrupt``."""

    def __init__(self, why: str, detail: str) -> None:
        super().__init__(f"{why}: {detail}")
        self.why, self.detail = why, detail


Tensors = dict[str, tuple[str, tuple[int, ...], bytes]]


# ---- reference readers ---------------------------------------------------------------------------

def _norm_torch(t: Any) -> tuple[str, tuple[int, ...], bytes]:
    import torch

    flat = t.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), raw


def read_safetensors(path: Path) -> Tensors:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: _norm_torch(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - any refusal of the reference library is the answer "corrupt"
        raise Refuse("corrupt", f"safetensors: {type(e).__name__}: {str(e)[:200]}") from None


_STORAGES = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "DoubleStorage": 8, "LongStorage": 8,
             "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
             "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16}


@dataclass
class _StorageRef:
    key: str
    itemsize: int
    numel: int


@dataclass
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


class _Unparseable(Exception):
    """The pickle uses something this structural reader does not model: no structural verdict."""


class _StructUnpickler(pickle.Unpickler):
    """Reads a torch pickle's structure (storages, views) without building a tensor or running anything."""

    def __init__(self, f: Any) -> None:
        super().__init__(f)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGES:
            return ("storage-type", _STORAGES[name])
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return lambda storage, offset, size, stride, *rest: _TensorRef(storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *rest: data
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        raise _Unparseable(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise _Unparseable("persistent id")
        kind = pid[1]
        if not (isinstance(kind, tuple) and kind[0] == "storage-type"):
            raise _Unparseable("storage type")
        if not isinstance(pid[4], int):
            raise _Unparseable("numel")
        return self.storages.setdefault(str(pid[2]), _StorageRef(str(pid[2]), kind[1], pid[4]))


def _reuses_elements(t: _TensorRef) -> bool:
    """Whether two indices of the view reach one element, counted exactly (strides [3, 2] over shape [3, 3]
    interleave without a repeat, though they fail the quick stride test)."""
    numel = math.prod(t.size)
    if numel > 1_000_000:
        raise _Unparseable("view too large to enumerate")
    offsets = {sum(i * st for i, st in zip(idx, t.stride, strict=False))
               for idx in itertools.product(*(range(n) for n in t.size))}
    return len(offsets) < numel


def _check_view(name: str, t: _TensorRef) -> None:
    """A state dict's tensor is a non-overlapping view that stays inside its storage."""
    if not all(isinstance(v, int) for v in (t.offset, *t.size, *t.stride)):
        raise _Unparseable("non-int view")
    if any(s < 0 for s in t.size) or any(s < 0 for s in t.stride) or t.offset < 0:
        raise Refuse("corrupt", f"tensor {name!r} has a negative size, stride or offset")
    if 0 in t.size:
        return
    span = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.size, t.stride, strict=False) if sz > 1):
        if stride < span and _reuses_elements(t):
            raise Refuse("corrupt", f"tensor {name!r} re-uses its own elements (stride {stride})")
        span += (size - 1) * stride
    if t.offset + span > t.storage.numel:
        raise Refuse("corrupt", f"tensor {name!r} reaches past its storage ({t.offset}+{span} > {t.storage.numel})")


def _zip_structure(path: Path) -> tuple[Any, dict[str, int]]:
    with zipfile.ZipFile(path) as z:
        sizes = {i.filename: i.file_size for i in z.infolist()}
        pkl = next((n for n in sizes if n.endswith("data.pkl")), None)
        if pkl is None:
            raise _Unparseable("no data.pkl")
        prefix = pkl[: -len("data.pkl")] + "data/"
        obj = _StructUnpickler(io.BytesIO(z.read(pkl))).load()
    return obj, {n[len(prefix):]: s for n, s in sizes.items() if n.startswith(prefix)}


def _legacy_structure(path: Path) -> tuple[Any, dict[str, int]]:
    """Legacy layout: magic, protocol, sys info, the dict, the storage keys; then per storage a count and its bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        up = _StructUnpickler(f)
        for _ in range(3):
            up.load()
        obj = up.load()
        keys = up.load()
        have: dict[str, int] = {}
        for key in keys:
            ref = up.storages.get(str(key))
            if ref is None:
                raise _Unparseable("storage key")
            raw = f.read(8)
            if len(raw) < 8:
                raise Refuse("corrupt", f"storage {key!r}: the file ends before its element count")
            (count,) = struct.unpack("<q", raw)
            if count != ref.numel:
                raise Refuse("corrupt", f"storage {key!r} counts {count} elements, the pickle says {ref.numel}")
            if f.tell() + count * ref.itemsize > size:
                raise Refuse("corrupt", f"storage {key!r} runs past the end of the file")
            f.seek(count * ref.itemsize, 1)
            have[str(key)] = count * ref.itemsize
    return obj, have


def _torch_structure(path: Path) -> None:
    """Structural checks torch.load does not make; raise Refuse when the file is provably unsound."""
    try:
        obj, have = _zip_structure(path) if zipfile.is_zipfile(path) else _legacy_structure(path)
    except (_Unparseable, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, zipfile.BadZipFile, RecursionError, MemoryError, OverflowError, struct.error, OSError,
            NotImplementedError):  # zipfile: "zip file version 23.5", an unknown compression
        return  # not modelled here: torch.load alone decides
    if not isinstance(obj, dict):
        return
    for name, t in obj.items():
        if not isinstance(t, _TensorRef):
            continue
        try:
            _check_view(str(name), t)
        except _Unparseable:
            return
        need = t.storage.numel * t.storage.itemsize
        if t.storage.key not in have:
            raise Refuse("corrupt", f"tensor {name!r}: storage record {t.storage.key!r} is missing")
        if have[t.storage.key] < need:
            raise Refuse("corrupt", f"tensor {name!r}: storage record {t.storage.key!r} holds "
                                    f"{have[t.storage.key]} bytes, its storage needs {need}")


def read_torch(path: Path, *, strict: bool = True) -> tuple[Tensors, set[str]]:
    """torch.load(weights_only=True) of a state dict; returns tensors and the names that are tied aliases."""
    import torch

    if strict:
        _torch_structure(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal of the reference library is the answer "corrupt"
        raise Refuse("corrupt", f"torch.load: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") \
            from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise Refuse("corrupt", "not a state dict of named tensors")
    size = path.stat().st_size
    seen: dict[tuple, str] = {}
    aliases = set()
    for name, t in obj.items():
        if t.layout != torch.strided:
            raise Refuse("corrupt", f"tensor {name!r} is not dense")
        if t.numel() * t.element_size() > 64 * size + (1 << 20):
            raise Refuse("corrupt", f"tensor {name!r} expands to {t.numel() * t.element_size()} bytes")
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen:
                aliases.add(name)
            seen.setdefault(key, name)
    return {k: _norm_torch(v) for k, v in obj.items()}, aliases


def _inside(root: Path, rel: str | bytes) -> bool:
    if isinstance(rel, bytes):  # proto2 hands back a string field that is not UTF-8 as bytes: no usable path
        return False
    if not rel or "\x00" in rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        return False
    try:
        target = (root / rel).resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return target == root.resolve() or root.resolve() in target.parents


def read_index(index: Path, *, pytorch: bool) -> tuple[Tensors, set[str]]:
    """What transformers reads: every tensor of every shard the weight_map names (paths must stay inside)."""
    try:
        data = json.loads(index.read_bytes())
    except (ValueError, RecursionError, OSError) as e:
        raise Refuse("corrupt", f"index: {type(e).__name__}") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise Refuse("corrupt", "index has no weight_map of strings")
    out: Tensors = {}
    aliases: set[str] = set()
    for rel in dict.fromkeys(wm.values()):
        if not _inside(index.parent, rel):
            raise Refuse("unsafe", f"shard path {rel!r} leaves the folder")
        p = index.parent / rel
        try:
            found = p.is_file()
        except (OSError, ValueError) as e:  # a name too long for the file system, say
            raise Refuse("corrupt", f"shard path {rel[:80]!r}: {type(e).__name__}") from None
        if not found:
            raise Refuse("corrupt", f"shard {rel[:80]!r} is missing")
        if pytorch:
            tensors, al = read_torch(p)
            aliases |= al
        else:
            tensors = read_safetensors(p)
        for n in tensors:
            if n in out:
                raise Refuse("corrupt", f"tensor {n!r} is in two shards")
        out.update(tensors)
    for n in wm:
        if n not in out:
            raise Refuse("corrupt", f"index maps {n!r} to a shard that does not hold it")
    return out, aliases


def read_weights_folder(folder: Path) -> tuple[Tensors, set[str]]:
    """A folder's weights as transformers finds them (also used to read our output folders)."""
    if (folder / "model.safetensors.index.json").is_file():
        return read_index(folder / "model.safetensors.index.json", pytorch=False)
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors"), set()
    if (folder / "pytorch_model.bin.index.json").is_file():
        return read_index(folder / "pytorch_model.bin.index.json", pytorch=True)
    if (folder / "pytorch_model.bin").is_file():
        return read_torch(folder / "pytorch_model.bin")
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
    if len(files) == 1:
        return (read_safetensors(files[0]), set()) if files[0].suffix == ".safetensors" else read_torch(files[0])
    raise Refuse("corrupt", "no weights found")


_PACKED = {21, 22, 23}


def _with_length(t: Any) -> Any:
    """A copy of external tensor ``t`` whose missing ``length`` is the shape's bytes (numel * itemsize).

    Without ``length`` numpy_helper reads from ``offset`` to the end of the file (and fails when more bytes
    follow the tensor), but onnxruntime reads the bytes the shape needs (verified with onnxruntime 1.31,
    which runs such a model; onnx.checker accepts it too), and so does llmconv: that is the reference. A
    file too short for them still fails, in the reshape.
    """
    import numpy as np
    from onnx import helper

    copy = type(t)()
    copy.CopyFrom(t)
    numel = int(np.prod(list(t.dims), dtype=np.int64)) if len(t.dims) else 1
    entry = copy.external_data.add()
    entry.key, entry.value = "length", str(numel * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize)
    return copy


def read_onnx(path: Path) -> Tensors:
    """onnx.load plus numpy_helper.to_array per initializer (main graph first, then subgraphs, outer name wins)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any refusal of the reference library is the answer "corrupt"
        raise Refuse("corrupt", f"onnx.load: {type(e).__name__}") from None
    if len(model.graph.sparse_initializer):
        raise Refuse("corrupt", "sparse initializers (llmconv must name them, not skip them)")
    names = [t.name for t in model.graph.initializer]
    if len(set(names)) != len(names):
        raise Refuse("corrupt", "duplicate initializer names")
    graphs = [model.graph]
    out: Tensors = {}
    while graphs:
        g = graphs.pop(0)
        for node in g.node:
            for a in node.attribute:
                graphs += [a.g] if a.type == 5 else list(a.graphs) if a.type == 10 else []
        for t in g.initializer:
            if t.name in out:
                continue
            if t.data_location == 1:
                kv = {e.key: e.value for e in t.external_data}
                if not _inside(path.parent, kv.get("location", "")):
                    raise Refuse("unsafe", f"external data location {kv.get('location')!r} leaves the folder")
            try:
                if t.data_type in _PACKED:
                    numel = int(np.prod(list(t.dims), dtype=np.int64)) if len(t.dims) else 1
                    nbytes = (numel * 4 + 7) // 8
                    if t.data_location == 1:
                        kv = {e.key: e.value for e in t.external_data}
                        with open(path.parent / kv["location"], "rb") as f:
                            f.seek(int(kv.get("offset", "0")))
                            raw = f.read(int(kv.get("length", nbytes)))
                    else:
                        raw = t.raw_data or np.asarray(t.int32_data, dtype="<i8").astype("u1").tobytes()
                    if len(raw) != nbytes:
                        raise ValueError("packed length")
                    out[t.name] = ("uint8", (nbytes,), bytes(raw))
                    continue
                if t.data_location == 1 and not any(e.key == "length" for e in t.external_data):
                    t = _with_length(t)
                a = numpy_helper.to_array(t, base_dir=str(path.parent))
                if a.dtype == object:
                    raise ValueError("string tensor")
                out[t.name] = (a.dtype.name, tuple(int(d) for d in a.shape), a.tobytes())
            except Exception as e:  # noqa: BLE001 - see above
                raise Refuse("corrupt", f"initializer {t.name!r}: {type(e).__name__}: {str(e)[:120]}") from None
    return out


def read_reference(kind: str, arg: Path) -> tuple[Tensors, set[str]]:
    """The reference reading of a case's input (raises Refuse)."""
    if kind == "st_single":
        return read_safetensors(arg), set()
    if kind in ("pt_zip", "pt_legacy"):
        return read_torch(arg)
    if kind == "onnx_inline" or kind == "onnx_external":
        return read_onnx(arg), set()
    if kind == "hf":
        try:
            config = json.loads((arg / "config.json").read_bytes())
        except (ValueError, RecursionError, OSError) as e:
            raise Refuse("corrupt", f"config.json: {type(e).__name__}") from None
        if not isinstance(config, dict):
            raise Refuse("corrupt", "config.json is not an object")
        return read_weights_folder(arg)
    return read_weights_folder(arg)


def read_output(dst: Path) -> Tensors:
    if dst.is_dir():
        return read_weights_folder(dst)[0]
    if dst.suffix == ".safetensors":
        return read_safetensors(dst)
    return read_torch(dst, strict=False)[0]


# ---- running the CLI in-process ------------------------------------------------------------------

@dataclass
class Run:
    argv: list[str]
    code: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # an exception that escaped the command, with its traceback
    timed_out: bool = False
    seconds: float = 0.0
    growth_mb: float = 0.0


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _limits(timeout: float, cap_mb: int) -> Iterator[None]:
    """An alarm that raises CaseTimeout, and an address-space cap, for the duration of one command."""
    main = threading.current_thread() is threading.main_thread()
    old_handler = None
    if main and timeout:
        def on_alarm(signum: int, frame: Any) -> None:
            raise CaseTimeout()

        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _status("VmSize") + cap_mb * (1 << 20)
    capped = cap_mb and (hard == resource.RLIM_INFINITY or cap <= hard)
    if capped:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        if capped:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if main and timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)


_RUNNER: Any = None


def run_cli(argv: list[str], *, timeout: float = 30.0, cap_mb: int = MEMORY_CAP_MB) -> Run:
    """Invoke ``llmconv ARGV`` in this process through typer's CliRunner, as tests/conftest.py's ``cli`` does."""
    global _RUNNER
    from typer.testing import CliRunner

    from llmconv.cli.app import app

    if _RUNNER is None:
        _RUNNER = CliRunner()
    run = Run(argv=list(argv))
    measured = _reset_peak()
    base = _status("VmRSS")
    t0 = time.perf_counter()
    try:
        with _limits(timeout, cap_mb):
            result = _RUNNER.invoke(app, argv, catch_exceptions=False)
        run.code, run.stdout, run.stderr = result.exit_code, result.stdout, result.stderr
    except CaseTimeout:
        run.timed_out = True
    except Exception:  # noqa: BLE001 - the harness records any exception escaping the CLI as a finding
        run.error = traceback.format_exc()
    run.seconds = time.perf_counter() - t0
    if measured:
        run.growth_mb = max(0, _status("VmHWM") - base) / (1 << 20)
    return run


# ---- judging a case ------------------------------------------------------------------------------

@dataclass
class Outcome:
    cls: str
    findings: list[tuple[str, str]] = field(default_factory=list)  # (class, detail)
    runs: list[Run] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.findings)

    def report(self) -> str:
        lines = [f"class: {self.cls}"] + [f"finding {c}: {d}" for c, d in self.findings]
        for r in self.runs:
            lines.append(f"$ llmconv {' '.join(_quote(a) for a in r.argv)}")
            lines.append(f"  exit {r.code}{' TIMEOUT' if r.timed_out else ''} in {r.seconds:.2f} s, "
                         f"peak +{r.growth_mb:.0f} MB")
            for label, text, most in (("stdout", r.stdout, 600), ("stderr", r.stderr, 1600),
                                      ("exception", r.error, 4000)):
                if text:
                    cut = text if len(text) <= most else text[:most // 2] + "\n...\n" + text[-most // 2:]
                    lines.append(f"  {label}:\n" + "\n".join("    " + ln for ln in cut.splitlines()))
        return "\n".join(lines)


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


def _digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if ".llmconv-" in p.name]


def _leaks(dst: Path) -> list[str]:
    found = []
    paths = [dst] if dst.is_file() or dst.is_symlink() else sorted(dst.rglob("*"))
    for p in paths:
        if p.is_symlink():
            found.append(f"{p.name} is a link")
        elif p.is_file() and FAKE_SECRET.encode() in p.read_bytes():
            found.append(f"{p.name} holds the secret")
    return found


def _compare(ref: Tensors, aliases: set[str], got: Tensors) -> tuple[str, str] | None:
    for name, value in got.items():
        if name not in ref:
            return "exit0-mismatch", f"output has tensor {name[:80]!r} the input does not"
        if value != ref[name]:
            r = ref[name]
            return "exit0-mismatch", (f"tensor {name[:80]!r}: output {value[0]}{list(value[1])} "
                                      f"{'same bytes' if value[2] == r[2] else 'other bytes'}, "
                                      f"reference {r[0]}{list(r[1])}")
    missing = [n for n in ref if n not in got and n not in aliases]
    if missing:
        return "exit0-dropped", f"output lacks {len(missing)} tensor(s) the reference reads: {missing[:3]}"
    return None


def _check_common(run: Run, findings: list[tuple[str, str]], allowed: tuple[int, ...]) -> None:
    cmd = run.argv[0]
    if run.timed_out:
        findings.append(("timeout", f"{cmd} ran past its time"))
        return
    if run.error is not None:
        findings.append(("traceback", f"{cmd}: exception escaped: {run.error.strip().splitlines()[-1][:200]}"))
        return
    text = run.stdout + run.stderr
    if run.growth_mb > MEMORY_BOUND_MB or "can't allocate memory" in text or "MemoryError" in text:
        findings.append(("memory", f"{cmd}: peak memory +{run.growth_mb:.0f} MB"))
    if run.code == 3:
        findings.append(("exit3", f"{cmd}: {_first_error(run)}"))
    elif run.code not in allowed:
        findings.append(("other-exit", f"{cmd}: exit {run.code}: {_first_error(run)}"))
    if "Traceback (most recent call last)" in text:
        findings.append(("traceback", f"{cmd}: a traceback was printed"))
    if run.code == 2:
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        if len(lines) != 1 or not lines[0].startswith("error:"):
            findings.append(("bad-stderr", f"{cmd}: exit 2 with {len(lines)} stderr lines: {run.stderr[:200]!r}"))
    try:
        obj = json.loads(run.stdout)
        if not isinstance(obj, dict) or obj.get("ok") is not (run.code == 0) or (
                run.code != 0 and (obj.get("error") or {}).get("code") != run.code and cmd != "verify"):
            findings.append(("bad-json", f"{cmd}: exit {run.code} but JSON ok={obj.get('ok')!r}"))
    except ValueError:
        findings.append(("bad-json", f"{cmd}: stdout is not one JSON object: {run.stdout[:120]!r}"))


def _first_error(run: Run) -> str:
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    return (lines[0] if lines else run.stdout.strip()[:200])[:300]


_SEED_REFS: dict[str, Tensors] = {}


def judge_case(case_dir: Path, spec: dict, *, seed_case: Path, timeout: float = 30.0) -> Outcome:
    """Run the CLI on the mutated input in ``case_dir`` and judge every run (see the module docstring)."""
    t0 = time.perf_counter()
    seed = SEEDS[spec["kind"]]
    arg = case_dir / seed.arg
    model = case_dir / MODEL_DIR
    out_dir = case_dir / "out"
    out_dir.mkdir()
    if seed.folder:
        dst = out_dir / "dst"
        to = ["--to", spec["dest"]]  # an hf folder stays an hf folder, with weights in that format
    else:
        dst = out_dir / ("dst.safetensors" if spec["dest"] == "safetensors" else "dst.bin")
        to = []
    before = _digest(model)
    findings: list[tuple[str, str]] = []
    runs: list[Run] = []

    inspect = run_cli(["inspect", str(arg), "--json"], timeout=timeout)
    runs.append(inspect)
    convert = run_cli(["convert", str(arg), str(dst), *to, "--json"], timeout=timeout)
    runs.append(convert)
    verify = None
    if seed.onnx:
        verify = run_cli(["verify", str(seed_case / seed.arg), str(arg), "--mode", "weights", "--json"],
                         timeout=timeout)
        runs.append(verify)

    try:
        ref, aliases = read_reference(spec["kind"], arg)
        refused = None
    except Refuse as e:
        ref, aliases, refused = {}, set(), e
    except RecursionError:
        ref, aliases, refused = {}, set(), Refuse("corrupt", "reference reader recursion")

    _check_common(inspect, findings, (0, 2))
    _check_common(convert, findings, (0, 2))
    if convert.code == 1:
        findings.append(("exit1-corrupt", f"convert called its own output of this input not equivalent: "
                                          f"{_first_error(convert)}"))
    if verify is not None:
        _check_common(verify, findings, (0, 1, 2))

    for run in (inspect, convert, verify):
        if run is None or run.code not in (0, 1):
            continue
        if run.code == 1 and run is not verify:
            continue
        if refused is not None:
            cls = "accepted-unsafe" if refused.why == "unsafe" else (
                "exit1-corrupt" if run.code == 1 else "accepted-corrupt")
            findings.append((cls, f"{run.argv[0]} exit {run.code} on an input the reference refuses "
                                  f"({refused.detail})"))
        elif run is inspect and run.code == 0:
            with contextlib.suppress(ValueError):
                info = json.loads(run.stdout)
                want = len([n for n in ref if n not in aliases])
                if info.get("tensors") != want:
                    findings.append(("exit0-mismatch", f"inspect says {info.get('tensors')} tensors, the reference "
                                                       f"reads {want}"))
        elif run is verify:
            if spec["kind"] not in _SEED_REFS:
                _SEED_REFS[spec["kind"]] = read_reference(spec["kind"], seed_case / seed.arg)[0]
            same = ref == _SEED_REFS[spec["kind"]]
            if (run.code == 0) != same:
                findings.append(("verify-wrong", f"verify exit {run.code}, but the reference readings are "
                                                 f"{'equal' if same else 'different'}"))

    if convert.code == 0 and refused is None:
        try:
            got = read_output(dst)
        except Refuse as e:
            findings.append(("exit0-mismatch", f"convert's output is unreadable: {e.detail}"))
        else:
            bad = _compare(ref, aliases, got)
            if bad:
                findings.append(bad)
    if convert.code == 0 and dst.exists():
        leaks = _leaks(dst)
        if leaks:
            findings.append(("leak", "; ".join(leaks[:3])))
    if convert.code != 0 and (dst.exists() or dst.is_symlink()):
        findings.append(("leftover", f"convert exit {convert.code} left {dst.name} at DST"))
    left = _leftovers(case_dir)
    if left:
        findings.append(("leftover", f"temporary files left: {left[:3]}"))
    if _digest(model) != before:
        findings.append(("input-modified", "the input's files changed"))
    if (case_dir / CODE_RAN_MARKER).exists():
        findings.append(("code-ran", "the model folder's evil.py ran"))

    findings.sort(key=lambda f: FINDINGS.index(f[0]))
    if findings:
        cls = findings[0][0]
    else:
        codes = [r.code for r in runs]
        cls = "ok2" if convert.code == 2 else ("ok1" if 1 in codes else "ok0")
    return Outcome(cls, findings, runs, time.perf_counter() - t0)


def warm_up(seed_root: Path, cache: Any) -> None:
    """Import what the commands import lazily (torch, onnx, transformers) so memory is measured per case."""
    import tempfile

    for kind in SEEDS:
        cache.path(kind)
    with tempfile.TemporaryDirectory(dir=seed_root) as tmp:
        for kind in ("st_single", "hf", "onnx_external", "pt_legacy"):
            case = Path(tmp) / kind
            cache.copy(kind, case)
            judge_case(case, {"kind": kind, "dest": "pytorch", "ops": []}, seed_case=cache.path(kind))
        shutil.rmtree(tmp, ignore_errors=True)
