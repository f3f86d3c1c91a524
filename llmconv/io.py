"""Safe paths, sizes and atomic outputs."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import glob
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from llmconv.errors import CorruptInput, DestinationError, InputError, LlmconvError, UnsafeInput, UsageError

# Outputs are meant to be shared: mkstemp and safetensors give 0600 otherwise.
FILE_MODE = 0o644
DIR_MODE = 0o755
# The most bytes handed to one write() call. On one large write the kernel gives the destination
# large page-cache folios, which measured 2-2.5x slower than cp on ext4 (Linux 6.18); writes of
# 256-512 KiB went as fast as cp.
WRITE_SLICE = 1 << 19

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Parse a size such as ``2GB`` (10**9, as transformers counts), ``500MB`` or ``1GiB``.

    Args:
        text: the size; a bare number is bytes.
    Returns:
        The size in bytes.
    Example:
        >>> parse_size("2GB")
        2000000000
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"cannot read size {text!r}", hint="write it like 2GB, 500MB or 1GiB")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if value < 1:
        raise UsageError(f"size {text!r} is less than one byte")
    return int(value)


def human_size(n: int | float) -> str:
    """Format bytes for people: ``1.50 GB``."""
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# Folders of links that llmconv made itself (llmconv.formats.hf.linked_view): resolved folder -> the resolved
# files its links may reach. Kept in this process only, so that no file in a model can claim this trust.
LINKED_VIEWS: dict[Path, frozenset[Path]] = {}


def check_usable_path(path: Path, *, must_exist: bool) -> None:
    """Raise InputError naming ``path`` when no file operation can use it: a NUL byte, a name longer than the
    filesystem allows, symbolic links that loop; with ``must_exist`` also when nothing is there (saying why:
    ``Path.exists`` says False for a link loop and raises for a NUL byte or a name too long)."""
    try:
        os.stat(path)
    except ValueError as e:
        raise InputError("the path holds a NUL byte, which no file name can", path=path) from e
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            longest = max((len(os.fsencode(part)) for part in Path(path).parts), default=0)
            raise InputError(f"the path is too long for the filesystem (its longest name is {longest} bytes, "
                             f"the whole {len(os.fsencode(path))})", path=path,
                             hint="file and folder names may have at most 255 bytes") from e
        if e.errno == errno.ELOOP:
            raise InputError("symbolic links in this path loop (a link leads back to itself)", path=path,
                             hint="fix or remove the link") from e
        if not must_exist:
            return
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            why = "a link to nothing" if os.path.islink(path) else "no such file or folder"
            raise InputError(why, path=path) from e
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from e


def safe_child(root: Path, relative: str, *, what: str, source: Path) -> Path:
    """Resolve ``relative`` under ``root`` and refuse anything that leaves it.

    Args:
        root: the model's folder.
        relative: a path taken from an index file or an ONNX external-data reference.
        what: what the reference is, for the message ("shard", "external data file").
        source: the file that holds the reference, named in the error.
    Returns:
        The resolved path, inside ``root``.
    """
    if not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
        raise UnsafeInput(f"{what} path {relative!r} is absolute; it must be relative to the model's folder",
                          path=source, hint="refusing to read outside the model")
    parts = Path(relative).parts
    if ".." in parts:
        raise UnsafeInput(f"{what} path {relative!r} leaves the model's folder",
                          path=source, hint="refusing to read outside the model")
    try:
        resolved = (root / relative).resolve()
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # a missing shard: the caller says so
            os.stat(resolved)  # a name too long passes resolve() and fails every later use
    except (ValueError, OSError, RuntimeError) as e:  # NUL byte, name too long, a link loop (RuntimeError < 3.13)
        why = ("holds a NUL byte" if isinstance(e, ValueError) else "has a name too long for the filesystem"
               if getattr(e, "errno", None) == errno.ENAMETOOLONG else "runs into symbolic links that loop"
               if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP
               else f"cannot be resolved ({getattr(e, 'strerror', None) or e})")
        raise CorruptInput(f"{what} path {relative!r} {why}", path=source, hint="fix the reference") from e
    root_resolved = root.resolve()
    if resolved != root_resolved and not within_model(root_resolved, resolved):
        raise UnsafeInput(f"{what} path {relative!r} resolves outside the model's folder (through a link?)",
                          path=source, hint="refusing to read outside the model")
    return resolved


def within_model(root: Path, resolved: Path) -> bool:
    """Whether ``resolved`` may be read as part of the model in ``root`` (both resolved): it lies under
    ``root``, in the ``blobs`` of the Hugging Face cache ``root`` is a snapshot of, or is a file that a
    :data:`LINKED_VIEWS` folder ``root`` links to."""
    blobs = _hf_cache_blobs(root)
    return (root in resolved.parents or (blobs is not None and blobs in resolved.parents)
            or resolved in LINKED_VIEWS.get(root, ()))


def _hf_cache_blobs(root: Path) -> Path | None:
    """The ``blobs`` folder when ``root`` is a Hugging Face cache snapshot (``models--org--name/snapshots/REV``),
    whose files are links into ``../../blobs``; links there stay inside the model."""
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        return root.parent.parent / "blobs"
    return None


def check_destination(src: Path, dst: Path, *, force: bool, reads: Iterable[Path | str | None] = ()) -> None:
    """Refuse a destination that exists (unless ``force``), equals the source, lies inside it, or is (or
    would write) a file the source reads.

    Args:
        src: the model read.
        dst: the destination; for a ``.onnx`` file, the external data files beside it count too.
        force: an existing destination may be replaced.
        reads: other files the command reads (a config, calibration data): never replaced either.
    """
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise DestinationError("destination is the source itself", path=dst, hint="choose another path")
    if s.is_dir() and s in d.parents:
        raise DestinationError(f"destination lies inside the source folder {src}", path=dst,
                               hint="write it outside the model's folder")
    if d.is_dir() and d in s.parents:
        raise DestinationError(f"destination is a folder that contains the source {src}; --force would delete it",
                               path=dst, hint="choose another path")
    inputs = input_files(src)
    for extra in reads:
        if extra is not None:
            inputs += input_files(Path(extra))
    clash = find_input([dst, *data_files_beside(dst)], inputs)
    if clash is not None:
        out, how, hit = clash
        what = "destination" if out == dst else f"the output's external data file {out.name}"
        raise DestinationError(f"{what} {how} {hit}, which the source reads; writing there would destroy it",
                               path=out, hint="choose another path")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise DestinationError("destination exists", path=dst, hint="pass --force to replace it")
    check_keep_folder(sources=[src], dst=dst, inputs=inputs, name=dst.name, owner=dst)


def data_files_beside(dst: Path) -> list[Path]:
    """The external data files an ONNX output at ``dst`` may write beside it (both names llmconv uses)."""
    dst = Path(dst)
    if dst.suffix.lower() != ".onnx":
        return []
    return [dst.with_name(f"{dst.name}.data"), dst.with_name(f"{dst.name}_data")]


def input_files(path: Path) -> list[Path]:
    """Every file that reading the model at ``path`` may open, as given (not resolved).

    The file itself; for an ONNX model also every external data file it names (even one that reading it
    would refuse); for a folder every file under it. Best effort: what cannot be read adds nothing.

    Args:
        path: a model file or folder (or any file a command reads).
    Returns:
        The paths, without duplicates.
    """
    path = Path(path)
    found: dict[Path, None] = {}
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for name in files:
                p = Path(root) / name
                found[p] = None
                if name.lower().endswith(".onnx"):
                    found.update(dict.fromkeys(onnx_named_files(p)))
    elif path.exists():
        found[path] = None
        found.update(dict.fromkeys(onnx_named_files(path)))
    return list(found)


def onnx_named_files(model: Path) -> list[Path]:
    """The external data files an ONNX file names, wherever they are; [] when it is not a readable ONNX file."""
    try:
        from llmconv.formats import registry

        if registry.detect(model).name != "onnx":
            return []
        from llmconv.formats.onnx import iter_graphs, load_graph

        view = load_graph(model)
    except (LlmconvError, ImportError):
        return []
    try:
        named: dict[Path, None] = {}
        for g in iter_graphs(view.model.graph):
            tensors = list(g.initializer)
            for node in g.node:
                for attr in node.attribute:
                    tensors.extend([attr.t] if attr.type == 4 else list(attr.tensors) if attr.type == 9 else [])
            for t in tensors:
                for e in t.external_data:
                    if e.key == "location" and e.value:
                        named[model.parent / e.value] = None  # an absolute location replaces the parent
        return list(named)
    finally:
        view.close()


def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def find_input(outputs: Iterable[Path], inputs: Iterable[Path]) -> tuple[Path, str, Path] | None:
    """The first output path that is an input file: the same path once resolved, a hard link to one (same
    device and inode), or a folder that holds one.

    Args:
        outputs: the paths a command would write or replace.
        inputs: the files it reads (see :func:`input_files`).
    Returns:
        ``(output, how, input)`` with ``how`` one of "is", "is a hard link to", "is a folder that holds";
        None when they are apart.
    """
    by_path: dict[Path, Path] = {}
    by_id: dict[tuple[int, int], Path] = {}
    for p in inputs:
        try:
            by_path.setdefault(p.resolve(), p)
        except (RuntimeError, ValueError, OSError):  # a link loop, a NUL byte, a name too long: nothing
            continue                                # can be written through such a path either
        ident = _identity(p)
        if ident is not None:
            by_id.setdefault(ident, p)
    for out in map(Path, outputs):
        try:
            r = out.resolve()
        except (RuntimeError, ValueError, OSError):  # the writer refuses such a path itself, naming it
            continue
        if r in by_path:
            return out, "is", by_path[r]
        ident = _identity(out)
        if ident is not None and ident in by_id:
            return out, "is a hard link to", by_id[ident]
        if r.is_dir():
            hit = next((p for q, p in by_path.items() if r in q.parents), None)
            if hit is not None:
                return out, "is a folder that holds", hit
    return None


def set_modes(path: Path) -> None:
    """Give outputs ordinary permissions (files 0644, folders 0755)."""
    if path.is_dir():
        os.chmod(path, DIR_MODE)
        for p in path.rglob("*"):
            os.chmod(p, DIR_MODE if p.is_dir() else FILE_MODE)
    else:
        os.chmod(path, FILE_MODE)


# errno values that say the destination cannot take the output (not that the input is bad).
_DEST_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
# Below this much free space a failed write is taken to be a full disk: torch's zip writer reports
# ENOSPC as "RuntimeError: ... unexpected pos".
_NEARLY_FULL = 1 << 20


def _cannot_write(dst: Path, e: BaseException) -> DestinationError | None:
    """The error to raise instead of ``e`` when ``e`` came from the destination's file system."""
    if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
        e = e.__context__  # torch's zip writer reports the OSError of our write() as "unexpected pos"
    if isinstance(e, OSError) and e.errno == errno.EFBIG and file_size_limit() is not None:
        return DestinationError(f"cannot write the output: {e.strerror}: it is over this process's file-size "
                                f"limit of {human_size(file_size_limit() or 0)} (ulimit -f)", path=dst,
                                hint="raise the limit, or write a smaller model")
    if isinstance(e, OSError) and e.errno in _DEST_ERRNOS:
        return DestinationError(f"cannot write the output: {e.strerror}", path=dst,
                                hint="free some space or choose another destination")
    if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, DestinationError):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(dst.parent if str(dst.parent) else ".").free < _NEARLY_FULL:
                return DestinationError(f"cannot write the output: no space left on the device ({e})".rstrip(),
                                        path=dst, hint="free some space or choose another destination")
    return None


def _name_destination(e: BaseException, tmp: Path, dst: Path) -> None:
    """Make an error about the temporary output (a writer refusing a tensor, the written file read back for
    verification) name ``dst`` instead: the temporary name is gone by the time the user reads it."""
    if not isinstance(e, LlmconvError) or e.path is None or not e.path.is_relative_to(tmp):
        return
    e.path = dst / e.path.relative_to(tmp)
    e.args = tuple(a.replace(str(tmp), str(dst)) if isinstance(a, str) else a for a in e.args)


def file_size_limit() -> int | None:
    """The soft limit on the size of a file this process writes (``ulimit -f``), in bytes; None when unlimited."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def build_failure(dst: Path, e: BaseException, *, scratch: Path, needed: int) -> DestinationError | None:
    """The error to raise instead of ``e``, a failure while an output for ``dst`` was built in ``scratch``, when
    the destination's file system (or the file-size limit) caused it; None when nothing shows that (a bug stays
    a bug, a corrupt input stays one).

    A write that failed says so by its errno. A tool that wrote a file and then read it back (onnxruntime's
    quantizers do, in the system's temporary folder too) only sees a short file: that is put down to the
    destination only when a file in ``scratch`` stopped at the file-size limit, the limit is below ``needed``
    (the tools write whole copies of the model), or the file system of ``scratch`` or of the temporary
    folder is (nearly) full.

    Args:
        dst: the user's destination, named in the error.
        e: what was raised.
        scratch: the folder the output was built in.
        needed: the size of the model being written (the source's files).
    """
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:  # onnxruntime and torch wrap the OSError of a write
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _DEST_ERRNOS:
            return _cannot_write(dst, cause)
        cause = cause.__cause__ or cause.__context__
    if isinstance(e, OSError):
        return None  # an OSError with another errno is not the destination's doing
    limit = file_size_limit()
    if limit is not None:
        at_limit = False
        for root, _dirs, files in os.walk(scratch):
            for name in files:
                with contextlib.suppress(OSError):
                    at_limit = at_limit or os.lstat(os.path.join(root, name)).st_size >= limit
        if at_limit or limit < needed:
            return DestinationError(f"cannot write the output: a file written for it was cut short at the "
                                    f"file-size limit of {human_size(limit)} (ulimit -f)", path=dst,
                                    hint="raise the limit, or write a smaller model")
    for folder, what in ((scratch, "the destination's file system"),
                         (Path(tempfile.gettempdir()), f"the temporary folder {tempfile.gettempdir()}")):
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
            if free < _NEARLY_FULL:
                return DestinationError(f"cannot write the output: {what} has {human_size(free)} free, and a file "
                                        "written for it came back cut short", path=dst,
                                        hint="free some space or choose another destination")
    return None


def check_free_space(dst: Path, needed: int) -> None:
    """Refuse to start an output of ``needed`` bytes that the destination's file system cannot hold."""
    parent = next((p for p in (dst.parent, *dst.parent.parents) if p.exists()), Path("."))
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if needed > free:
        raise DestinationError(f"the output needs {human_size(needed)}, and {parent} has {human_size(free)} free",
                               path=dst, hint="free some space or choose another destination")


# Temporary names carry the owner's pid and a tag of its host, so that a later run on the same destination
# can tell a leftover of a dead process (SIGKILL, a crash, a power cut) from the output of a live one.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_KINDS = ("tmp", "old", "scratch")
# Outputs renamed into place by this process since the CLI's command began: (destination, old copy left).
_COMMITTED: list[tuple[Path, Path | None]] = []


def _temp_prefix(dst: Path, kind: str) -> str:
    return f".{dst.name}.llmconv-{kind}-{os.getpid()}-{_HOST}-"


def _leftover_re(name: str) -> re.Pattern[str]:
    # `.NAME.llmconv-KIND-PID-HOST-RANDOM`, and a scratch folder made beside one of those (`..NAME.llmconv-tmp-
    # PID-HOST-RANDOM.llmconv-scratch-PID-HOST-RANDOM`, a spill file's folder): nothing else is ever removed.
    part = rf"llmconv-(?:{'|'.join(_KINDS)})-(\d+)-{_HOST}-\w+"
    return re.compile(rf"^\.\.?{re.escape(name)}\.{part}(?:\.llmconv-scratch-\d+-{_HOST}-\w+)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process: not ours to judge
    return True


def remove_leftovers(dst: Path) -> list[Path]:
    """Remove the temporary files and folders that dead llmconv processes left beside ``dst``.

    Only names of the exact form llmconv gives them for this destination, made on this host, whose
    process no longer runs.

    Returns:
        What was removed.
    """
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    pattern = _leftover_re(dst.name)
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):  # not ours to fail on: the run goes on without cleaning it
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def check_replaceable(dst: Path, *, folder: bool, force: bool) -> None:
    """Refuse to replace an existing ``dst`` without ``force``, and a folder by a file."""
    if (dst.exists() or dst.is_symlink()) and not force:
        raise DestinationError("destination exists", path=dst, hint="pass --force to replace it")
    if not folder and dst.is_dir() and not dst.is_symlink():
        raise DestinationError("destination is a folder, and the output is a file; refusing to delete the folder",
                               path=dst, hint="give a file path, or remove the folder yourself")


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers the program had.

    Around the renames that put an output in place: an interrupt lands before or after them, never
    between, so what the CLI then says about the destination is true. Only the main thread receives
    Python signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _HOLDING.append(None)
    held: list[int] = []
    saved: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:  # None: set outside Python, and it could not be put back
            saved[sig] = handler
            signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        _HOLDING.pop()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)


# One entry per held_signals() block being run.
_HOLDING: list[None] = []
# The program's check for an interrupt that came and has not stopped the run yet (the CLI defers one that
# lands inside an import, and a library may swallow one): it raises it. Called right before an output is
# renamed into place, so that such an interrupt stops the run while the destination is still as it was.
_INTERRUPT_CHECK: list[Callable[[], None]] = []


def set_interrupt_check(check: Callable[[], None] | None) -> None:
    """Install (or with None remove) the check :func:`before_commit` runs; the CLI sets it."""
    _INTERRUPT_CHECK[:] = [check] if check is not None else []


def before_commit() -> None:
    """Raise an interrupt that came during the run, before an output is put in place (see above)."""
    for check in _INTERRUPT_CHECK:
        check()


def forget_commits() -> None:
    """Start a new command: no output of it is in place yet (see :func:`interrupt_outcome`)."""
    _COMMITTED.clear()


def interrupt_outcome() -> str:
    """What an interrupt left behind, for the CLI's message: the destination as it was, or the new output."""
    if not _COMMITTED:
        return "the destination was left as it was"
    done = ", ".join(str(d) for d, _ in _COMMITTED)
    left = [str(old) for _, old in _COMMITTED if old is not None]
    old = (f"; the old copy is left at {', '.join(left)} (the next llmconv run on it removes it)" if left
           else "")
    return f"the new output was already in place at {done}{old}"


def _note_commit(dst: Path, old_left: Path | None) -> None:
    # Outputs built inside our own scratch or temporary folders are steps, not the user's destination.
    if not _in_scratch(dst):
        _COMMITTED.append((dst, old_left))


@contextlib.contextmanager
def atomic_output(dst: Path, *, folder: bool, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; rename it into place only if the block completes.

    On any exception (a failed verification included) the temporary output is removed and
    ``dst`` is left as it was; inside a :func:`keep_failed` block a failed verification moves it
    there instead. With ``force`` an existing ``dst`` is replaced, after the new output is
    complete; an old folder is moved aside and removed with SIGINT/SIGTERM held, so an interrupt
    leaves either the old destination or the new one, never a mix. Leftovers of dead llmconv
    processes beside ``dst`` are removed first.

    Args:
        dst: the final destination.
        folder: whether the output is a folder (else a file).
        force: replace an existing destination.
    """
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    check_replaceable(dst, folder=folder, force=force)
    # Folders made for the output are removed again if it fails: the file system is left as it was.
    made = [p for p in (parent, *parent.parents) if not p.exists()]
    committed = False
    tmp: Path | None = None
    try:
        try:
            remove_leftovers(dst)
            # Signals held while the temporary name is made: an interrupt then always finds it to remove.
            with held_signals():
                tmp = _make_temp(dst, parent, folder=folder)
            yield tmp
            set_modes(tmp)
            if not _HOLDING:  # inside a held block, its caller checked before it (several files go in together)
                before_commit()
            with held_signals():
                old = _replace(tmp, dst)
                committed = True
                if old is not None:
                    _remove(old)
                _note_commit(dst, old if old is not None and (old.exists() or old.is_symlink()) else None)
        except BaseException as e:
            if committed:
                raise  # an interrupt held during the swap: the new output is in place
            # A failed verification inside a keep_failed block moves the output there instead.
            if tmp is not None and not keep_failure(e, tmp, dst, folder=folder):
                _remove(tmp)
            instead = _cannot_write(dst, e)
            if instead is not None:
                raise instead from e
            if tmp is not None:
                _name_destination(e, tmp, dst)
            raise
    except BaseException:
        if not committed:
            for p in made:  # deepest first; only the empty folders made here
                with contextlib.suppress(OSError):
                    p.rmdir()
        raise


def _make_temp(dst: Path, parent: Path, *, folder: bool) -> Path:
    prefix = _temp_prefix(dst, "tmp")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if folder:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
        os.close(fd)
        return Path(name)
    except OSError as e:
        where = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
        why = f"{where} is a file, not a folder" if where is not None else (e.strerror or str(e))
        raise DestinationError(f"cannot create the output here: {why}", path=dst,
                               hint="choose a destination in a folder you can write") from e


def _replace(tmp: Path, dst: Path) -> Path | None:
    """Rename ``tmp`` to ``dst``; returns the old folder moved aside, for the caller to remove."""
    if dst.is_dir() and not dst.is_symlink():
        # A folder cannot be renamed over a folder: move the old one aside first.
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst, "old"), dir=dst.parent))
        os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        return old
    if tmp.is_dir() and (dst.exists() or dst.is_symlink()):
        dst.unlink()
    os.replace(tmp, dst)
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def scratch_dir(near: Path) -> Iterator[str]:
    """A temporary folder on the same filesystem as ``near`` (for spill files), removed on the way out.

    Named after ``near`` and this process, like atomic_output's temporary names; leftovers of dead
    processes for ``near`` are removed first.
    """
    near = Path(near)
    parent = near.parent if near.parent.exists() else Path(".")
    remove_leftovers(parent / near.name)
    with tempfile.TemporaryDirectory(prefix=_temp_prefix(near, "scratch"), dir=parent) as name:
        try:
            yield name
        except BaseException as e:  # a failed verification keeps the output registered in here (keep_candidate)
            _keep_registered(e, Path(name))
            raise


def open_output(path: Path) -> BinaryIO:
    """Open ``path`` to write it from the start, without truncating it when it is empty.

    ext4 (``auto_da_alloc``) writes a file back when it is closed if it was truncated at open: an
    ``open(path, "wb")`` of atomic_output's empty temporary file made every close wait for that
    flush (0.1-0.2 s per 0.5 GB), which cp, creating a new file, never does.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def write_sliced(f: BinaryIO, data: Any) -> int:
    """Write a bytes-like object in slices of at most WRITE_SLICE bytes, without copying it.

    Returns:
        The number of bytes written.
    """
    view = memoryview(data).cast("B")
    for start in range(0, view.nbytes, WRITE_SLICE):
        f.write(view[start:start + WRITE_SLICE])
    return view.nbytes


class SlicedWriter:
    """A binary file for ``torch.save``, which writes each storage in one call: writes go in slices."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def write(self, data: Any) -> int:
        return write_sliced(self._f, data)

    def flush(self) -> None:
        self._f.flush()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


# ---- keeping what failed verification (--keep-failed DIR) ------------------------------------------------

REPORT_SUFFIX = ".report.json"
# A report recording an earlier keep is read to decide whether its files may be replaced: larger is not ours.
_RECORD_LIMIT = 64 << 20


@dataclasses.dataclass
class _Keeping:
    """The state of one ``keep_failed`` block."""

    folder: Path
    made: list[Path] = dataclasses.field(default_factory=list)  # folders made for it, deepest first
    # The output being verified in a scratch folder, registered by its writer: (path, destination, folder?, hook).
    candidate: tuple[Path, Path, bool, Callable[[], Any] | None] | None = None
    inputs: list[dict[str, Any]] | None = None  # the feeds of the latest outputs comparison


_KEEP: contextvars.ContextVar[_Keeping | None] = contextvars.ContextVar("llmconv_keep_failed", default=None)


class _CannotKeep(Exception):
    """Why a failed output could not be kept (it is then removed, as without keep_failed)."""


@contextlib.contextmanager
def keep_failed(folder: str | Path | None) -> Iterator[None]:
    """Keep, in ``folder``, what fails verification instead of deleting it.

    Inside the block, when a command's verification fails (convert and its ONNX export's check, quantize
    after its last fallback, prune's checks: a NotEquivalent), the temporary output that failed is moved (renamed;
    copied only across file systems) to ``folder/NAME``, NAME being the destination's name: a folder whole, an
    ONNX file with its external data files. ``NAME.report.json`` beside it holds the verification report (for
    quantize, with its ``attempts``) and a ``kept`` record; the error's ``kept`` is that path and its message
    says where. ``verify`` keeps ``NAME.report.json`` (NAME: the candidate's) and the inputs it ran, one
    ``NAME.inputs-K.npz`` per input sample, each accepted by ``verify --inputs``. Any other failure (bad input,
    a bug, an interrupt) removes the temporary output as before.

    Each command checks the folder before any work, with a DestinationError (exit 2): it must not be the
    destination or lie inside it, nor be a source or lie inside one, and no name kept may be a file the command
    reads. The folder is made when missing (and removed on the way out if nothing was kept in it). An existing
    ``folder/NAME`` is replaced only when llmconv kept it there for the same destination (its
    ``NAME.report.json`` records so); any other file in the way is refused up front.

    Args:
        folder: where to keep failed outputs; None keeps nothing (as outside the block).
    Example:
        >>> with keep_failed("failed"):
        ...     quantize("model.onnx", "model-int8.onnx", target="cpu", method="int4")
    """
    if folder is None:
        token = _KEEP.set(None)
        try:
            yield
        finally:
            _KEEP.reset(token)
        return
    folder = Path(folder)
    check_usable_path(folder, must_exist=False)
    if folder.exists() and not folder.is_dir():
        raise DestinationError("this is a file; --keep-failed takes a folder", path=folder,
                               hint="give a folder (made when missing)")
    state = _Keeping(folder)
    token = _KEEP.set(state)
    try:
        yield
    finally:
        _KEEP.reset(token)
        for p in state.made:  # deepest first; only the folders made here, and only when still empty
            with contextlib.suppress(OSError):
                p.rmdir()


def keep_failed_dir() -> Path | None:
    """The folder of the enclosing :func:`keep_failed` block; None outside one."""
    state = _KEEP.get()
    return state.folder if state is not None else None


def _in_scratch(path: Path) -> bool:
    # A path inside llmconv's own scratch or temporary folders: a step of a command, not the user's destination.
    return any(".llmconv-scratch-" in part or ".llmconv-tmp-" in part for part in Path(path).parts)


def _single_names(values: Any) -> set[str]:
    """The plain file names in a record (nothing with a folder part: a record never reaches outside its folder)."""
    if not isinstance(values, list):
        return set()
    return {v for v in values if isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v
            and "/" not in v and "\\" not in v}


def _recorded(folder: Path, name: str, owner: Path) -> set[str]:
    """The names that llmconv kept in ``folder`` for ``owner`` (the destination, or verify's candidate), from
    ``NAME.report.json``'s ``kept`` record; empty when there is none, or it is for another path."""
    record = folder / f"{name}{REPORT_SUFFIX}"
    try:
        if record.is_symlink() or not record.is_file() or record.stat().st_size > _RECORD_LIMIT:
            return set()
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    kept = data.get("kept") if isinstance(data, dict) else None
    if not isinstance(kept, dict) or kept.get("for") != str(Path(owner).resolve()):
        return set()
    # Only names a keep for NAME gives (NAME, NAME.data, NAME_data, NAME.report.json, NAME.inputs-K.npz).
    names = {n for n in _single_names(kept.get("files")) if n == name or n.startswith((f"{name}.", f"{name}_"))}
    return names | {record.name}


def _kept_names(folder: Path, name: str, *, model: bool) -> list[Path]:
    """The paths a keep for NAME may write: the output, its data files and report; verify's report and inputs."""
    if model:
        main = folder / name
        return [main, *data_files_beside(main), folder / f"{name}{REPORT_SUFFIX}"]
    inputs = sorted(folder.glob(f"{glob.escape(name)}.inputs-*.npz")) if folder.is_dir() else []
    return [folder / f"{name}{REPORT_SUFFIX}", *inputs]


def _in_the_way(folder: Path, name: str, owner: Path, paths: Iterable[Path]) -> Path | None:
    """The first of ``paths`` that exists and that llmconv did not keep there for ``owner``."""
    ours = _recorded(folder, name, owner)
    return next((p for p in paths if (p.exists() or p.is_symlink()) and p.name not in ours), None)


def check_keep_folder(*, sources: Iterable[Path], dst: Path | None, inputs: list[Path], name: str,
                      owner: Path) -> None:
    """Check the folder of the enclosing :func:`keep_failed` block for one command, and make it; nothing
    outside such a block (nor for a step that writes into llmconv's own scratch folders).

    Args:
        sources: the models the command reads (its source; verify's reference and candidate).
        dst: the destination (None for verify).
        inputs: every file the command reads (see :func:`input_files`).
        name: the name kept (the destination's; verify's candidate's).
        owner: the path a keep is recorded for: the destination, or verify's candidate.
    Raises:
        DestinationError: the folder is a file, the destination or inside it, a source or inside one; a name
            kept would be a file the command reads, or would replace one that llmconv did not keep there.
    """
    state = _KEEP.get()
    if state is None or _in_scratch(owner):
        return
    state.candidate, state.inputs = None, None  # a new command: nothing of an earlier one is kept
    folder = state.folder
    check_usable_path(folder, must_exist=False)
    hint = "give --keep-failed another folder"
    if folder.exists() and not folder.is_dir():
        raise DestinationError("this is a file; --keep-failed takes a folder", path=folder,
                               hint="give a folder (made when missing)")
    k = folder.resolve()
    if dst is not None:
        d = dst.resolve()
        if k == d or d in k.parents:
            raise DestinationError(f"the folder for failed outputs {'is' if k == d else 'lies inside'} the "
                                   f"destination {dst}", path=folder, hint=hint)
        if k == d.parent:
            raise DestinationError(f"a failed output kept in this folder would be the destination {dst} itself",
                                   path=folder, hint=hint)
    for src in sources:
        s = Path(src).resolve()
        if k == s or (s.is_dir() and s in k.parents):
            raise DestinationError(f"the folder for failed outputs {'is' if k == s else 'lies inside'} the "
                                   f"{'folder of the ' if k != s else ''}model {src}, which the command reads",
                                   path=folder, hint=hint)
    paths = _kept_names(folder, name, model=dst is not None)
    clash = find_input(paths, inputs)
    if clash is not None:
        out, how, hit = clash
        raise DestinationError(f"a failed output kept as {out} would replace a file the command reads: {out.name} "
                               f"{how} {hit}", path=folder, hint=hint)
    taken = _in_the_way(folder, name, owner, paths)
    if taken is not None:
        raise DestinationError(f"{taken.name} is there, and llmconv did not keep it for {owner}; a failed output "
                               "kept here would replace it", path=folder, hint=f"remove it, or {hint}")
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
        why = f"{where} is a file, not a folder" if where is not None else (e.strerror or str(e))
        raise DestinationError(f"cannot make the folder for failed outputs: {why}", path=folder, hint=hint) from e
    state.made.extend(p for p in missing if p not in state.made)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DestinationError("cannot write in the folder for failed outputs", path=folder, hint=hint)


def keep_candidate(output: Path, dst: Path, *, folder: bool, prepare: Callable[[], Any] | None = None) -> None:
    """Register the output about to be verified in a scratch folder (:func:`scratch_dir`) for ``dst``: when a
    NotEquivalent leaves that scratch folder inside a :func:`keep_failed` block, this output is kept.

    Args:
        output: the output file (an ONNX model, its data files beside it) or folder.
        dst: the user's destination (names it, records the keep).
        folder: whether the output is a folder.
        prepare: run just before it is kept (e.g. to copy the config files a folder needs to run).
    """
    state = _KEEP.get()
    if state is not None and not _in_scratch(dst):
        state.candidate = (Path(output), Path(dst), folder, prepare)


def note_inputs(feeds: list[dict[str, Any]]) -> None:
    """Record the feeds an outputs comparison runs, for :func:`keep_report` (inside a keep_failed block)."""
    state = _KEEP.get()
    if state is not None:
        state.inputs = feeds


def keep_failure(error: BaseException, output: Path, dst: Path, *, folder: bool) -> bool:
    """Inside a :func:`keep_failed` block, move the output that failed verification (``error`` a NotEquivalent)
    into the block's folder as ``dst``'s name, with its report, and say so in the error.

    Returns:
        Whether ``output`` was kept (moved away): otherwise the caller removes it, as without the block.
    """
    from llmconv.errors import NotEquivalent

    state = _KEEP.get()
    if state is None or not isinstance(error, NotEquivalent) or error.kept is not None or _in_scratch(dst):
        return False
    output, dst = Path(output), Path(dst)
    name = dst.name
    target = state.folder / name
    report_path = state.folder / f"{name}{REPORT_SUFFIX}"
    moves = [(output, target)]
    if not folder:  # an ONNX file's external data files, under the names the graph refers to
        moves += [(p, state.folder / p.name) for p in onnx_named_files(output)
                  if p.parent == output.parent and p.is_file() and not p.is_symlink()]
    record = {"for": str(dst.resolve()), "output": str(target), "report": str(report_path),
              "files": [t.name for _, t in moves] + [report_path.name]}
    text = f"the failed output is kept at {target}, its report at {report_path}"
    report = getattr(error, "report", None)
    has_extra = report is not None and hasattr(report, "extra")
    notes = list(report.notes) if has_extra else []
    try:
        with held_signals():  # an interrupt never leaves half an output in the folder
            _place(state, name, dst, [t for _, t in moves] + [report_path], moves=moves)
            try:
                if has_extra:
                    from llmconv.verification.outputs import is_gate_hint

                    report.extra["kept"] = record
                    # The output need not be written again with --no-verify to be searched: it is here.
                    src = getattr(report, "reference", None) or "SRC"
                    report.notes = [f"to name the first layer or node where the models part, run llmconv verify "
                                    f"{src} {target} --localize" if is_gate_hint(n) else n for n in notes]
                data = report.to_json() if report is not None and hasattr(report, "to_json") else {"ok": False}
                data["kept"] = record
                data["error"] = {"code": error.exit_code, "message": f"{error}; {text}", "kept": str(target)}
                _write_json(report_path, data)
            except _CannotKeep:
                for src, kept in reversed(moves):  # the output goes back, to be removed as without the block
                    with contextlib.suppress(OSError):
                        _move(kept, src)
                raise
    except _CannotKeep as e:
        if has_extra:
            report.extra.pop("kept", None)
            report.notes = notes
        error.amend(f"the failed output could not be kept in {state.folder}: {e}")
        return False
    error.kept = target
    error.amend(text)
    return True


def _place(state: _Keeping, name: str, owner: Path, paths: list[Path], *, moves: list[tuple[Path, Path]]) -> None:
    """Make room for ``paths`` in the keep folder (only replacing what llmconv kept there for ``owner``), then do
    ``moves``; on failure, take back what was moved and raise _CannotKeep."""
    folder = state.folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _CannotKeep(e.strerror or str(e)) from e
    ours = _recorded(folder, name, owner)
    taken = next((p for p in paths if (p.exists() or p.is_symlink()) and p.name not in ours), None)
    if taken is not None:
        raise _CannotKeep(f"{taken} is there, and llmconv did not keep it for {owner}")
    for old in sorted(ours):  # the earlier failed output for this destination, replaced whole
        _remove(folder / old)
    done: list[tuple[Path, Path]] = []
    try:
        for src, dst in moves:
            _move(src, dst)
            done.append((src, dst))
            set_modes(dst)
    except OSError as e:
        for src, dst in reversed(done):
            with contextlib.suppress(OSError):
                _move(dst, src)
        raise _CannotKeep(e.strerror or str(e)) from e


def _move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; across file systems, copy it beside ``dst`` under a temporary name, rename that,
    and remove ``src``."""
    try:
        os.replace(src, dst)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    tmp = dst.with_name(f".{dst.name}.llmconv-tmp-{os.getpid()}-{_HOST}-copy")
    try:
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, tmp, symlinks=True)
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise
    _remove(src)


def strict_json(value: Any) -> Any:
    """Strict JSON: non-finite numbers as the strings "nan", "inf", "-inf" (as the CLI's --json writes them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.llmconv-tmp-{os.getpid()}-{_HOST}-json")
    try:
        tmp.write_text(json.dumps(strict_json(data), indent=2, default=str, allow_nan=False) + "\n", encoding="utf-8")
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _CannotKeep(e.strerror or str(e)) from e


def _keep_registered(error: BaseException, scratch: Path) -> None:
    """A NotEquivalent leaving the scratch folder ``scratch``: keep the registered output if it lies inside it."""
    from llmconv.errors import NotEquivalent

    state = _KEEP.get()
    if state is None or state.candidate is None or not isinstance(error, NotEquivalent):
        return
    output, dst, folder, prepare = state.candidate
    try:
        inside = scratch.resolve() in output.resolve().parents
    except (OSError, RuntimeError):
        inside = False
    if not inside or not (output.exists() or output.is_symlink()):
        return
    state.candidate = None
    if prepare is not None:
        with contextlib.suppress(OSError, LlmconvError):  # the output is kept without what it could not add
            prepare()
    keep_failure(error, output, dst, folder=folder)


def keep_report(report: Any, candidate: Path) -> Any:
    """``verify``'s keep: inside a :func:`keep_failed` block, write a failing report to ``NAME.report.json`` and
    the inputs the outputs comparison ran to ``NAME.inputs-K.npz`` (one per sample; ``verify --inputs`` takes each),
    NAME being the candidate's name; ``report.extra["kept"]`` and a note say where.

    Returns:
        ``report``.
    """
    state = _KEEP.get()
    if state is None or report.passed:
        return report
    candidate = Path(candidate)
    name = candidate.name
    folder = state.folder
    report_path = folder / f"{name}{REPORT_SUFFIX}"
    feeds = state.inputs or []
    inputs = [folder / f"{name}.inputs-{i}.npz" for i in range(1, len(feeds) + 1)]
    record: dict[str, Any] = {"for": str(candidate.resolve()), "report": str(report_path),
                              "inputs": [str(p) for p in inputs],
                              "files": [report_path.name, *(p.name for p in inputs)]}
    written: list[Path] = []
    try:
        with held_signals():
            _place(state, name, candidate, [report_path, *inputs], moves=[])
            for path, feed in zip(inputs, feeds, strict=True):
                _write_npz(path, feed)
                written.append(path)
            if feeds:
                note = (f"the report is kept at {report_path} and the inputs run at {inputs[0]}"
                        + (f" ... {inputs[-1].name} (one file per input sample)" if len(inputs) > 1 else "")
                        + f"; rerun one with llmconv verify {getattr(report, 'reference', None) or 'REFERENCE'} "
                          f"{candidate} --inputs FILE")
            elif report.mode == "weights":
                note = f"the report is kept at {report_path} (weights mode runs no inputs)"
            else:
                note = f"the report is kept at {report_path} (the inputs of this comparison are not kept)"
            report.extra["kept"] = record
            report.notes.append(note)
            _write_json(report_path, report.to_json())
    except (_CannotKeep, OSError) as e:
        for p in written:
            _remove(p)
        report.extra.pop("kept", None)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        report.notes.append(f"the report could not be kept in {folder}: {why}")
    return report


def _write_npz(path: Path, feed: dict[str, Any]) -> None:
    """One feed as an .npz that ``verify --inputs`` reads: the empty past key/values a token model's feed carries
    are left out (verify makes them again)."""
    import numpy as np

    arrays = {k: np.asarray(v) for k, v in feed.items()
              if not ("input_ids" in feed and k.startswith("past_key_values."))}
    tmp = path.with_name(f".{path.name}.llmconv-tmp-{os.getpid()}-{_HOST}-npz")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
