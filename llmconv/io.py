"""Safe paths, sizes and atomic outputs."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from llmconv.errors import DestinationError, UnsafeInput, UsageError

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
    resolved = (root / relative).resolve()
    root_resolved = root.resolve()
    blobs = _hf_cache_blobs(root_resolved)
    if resolved != root_resolved and root_resolved not in resolved.parents and (
            blobs is None or blobs not in resolved.parents):
        raise UnsafeInput(f"{what} path {relative!r} resolves outside the model's folder (through a link?)",
                          path=source, hint="refusing to read outside the model")
    return resolved


def _hf_cache_blobs(root: Path) -> Path | None:
    """The ``blobs`` folder when ``root`` is a Hugging Face cache snapshot (``models--org--name/snapshots/REV``),
    whose files are links into ``../../blobs``; links there stay inside the model."""
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        return root.parent.parent / "blobs"
    return None


def check_destination(src: Path, dst: Path, *, force: bool) -> None:
    """Refuse a destination that exists (unless ``force``), equals the source, or lies inside it."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise DestinationError("destination is the source itself", path=dst, hint="choose another path")
    if s.is_dir() and s in d.parents:
        raise DestinationError(f"destination lies inside the source folder {src}", path=dst,
                               hint="write it outside the model's folder")
    if d.is_dir() and d in s.parents:
        raise DestinationError(f"destination is a folder that contains the source {src}; --force would delete it",
                               path=dst, hint="choose another path")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise DestinationError("destination exists", path=dst, hint="pass --force to replace it")


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
    if isinstance(e, OSError) and e.errno in _DEST_ERRNOS:
        return DestinationError(f"cannot write the output: {e.strerror}", path=dst,
                                hint="free some space or choose another destination")
    if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, DestinationError):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(dst.parent if str(dst.parent) else ".").free < _NEARLY_FULL:
                return DestinationError(f"cannot write the output: no space left on the device ({e})".rstrip(),
                                        path=dst, hint="free some space or choose another destination")
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


@contextlib.contextmanager
def atomic_output(dst: Path, *, folder: bool, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; rename it into place only if the block completes.

    On any exception (a failed verification included) the temporary output is removed and
    ``dst`` is left as it was. With ``force`` an existing ``dst`` is replaced, after the new
    output is complete.

    Args:
        dst: the final destination.
        folder: whether the output is a folder (else a file).
        force: replace an existing destination.
    """
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise DestinationError("destination exists", path=dst, hint="pass --force to replace it")
    if not folder and dst.is_dir() and not dst.is_symlink():
        raise DestinationError("destination is a folder, and the output is a file; refusing to delete the folder",
                               path=dst, hint="give a file path, or remove the folder yourself")
    # Folders made for the output are removed again if it fails: the file system is left as it was.
    made = [p for p in (parent, *parent.parents) if not p.exists()]
    prefix = f".{dst.name}.llmconv-tmp-"
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if folder:
                tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            else:
                fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
                os.close(fd)
                tmp = Path(name)
        except OSError as e:
            where = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
            why = f"{where} is a file, not a folder" if where is not None else (e.strerror or str(e))
            raise DestinationError(f"cannot create the output here: {why}", path=dst,
                                   hint="choose a destination in a folder you can write") from e
        try:
            yield tmp
            set_modes(tmp)
            _replace(tmp, dst)
        except BaseException as e:
            _remove(tmp)
            instead = _cannot_write(dst, e)
            if instead is not None:
                raise instead from e
            raise
    except BaseException:
        for p in made:  # deepest first; only the empty folders made here
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _replace(tmp: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        # A folder cannot be renamed over a folder: move the old one aside first, then drop it.
        old = dst.with_name(f".{dst.name}.llmconv-old-{os.getpid()}")
        os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        _remove(old)
    elif tmp.is_dir() and (dst.exists() or dst.is_symlink()):
        dst.unlink()
        os.replace(tmp, dst)
    else:
        os.replace(tmp, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def scratch_dir(near: Path) -> tempfile.TemporaryDirectory:
    """A temporary folder on the same filesystem as ``near`` (for spill files)."""
    parent = near.parent if near.parent.exists() else Path(".")
    return tempfile.TemporaryDirectory(prefix=f".{near.name}.llmconv-scratch-", dir=parent)


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
