"""What quantize and prune share: where ONNX outputs are built, how they are put in place, companion files."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmconv.errors import DestinationError
from llmconv.io import (
    atomic_output,
    before_commit,
    build_failure,
    check_replaceable,
    held_signals,
    input_files,
    scratch_dir,
)

# Files that travel with an ONNX model folder (what a verifier or a runtime needs besides the graph).
COMPANION_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                      "added_tokens.json", "vocab.*", "merges.txt", "*.model", "chat_template*",
                      "preprocessor_config.json")


def scratch_near(dst: Path) -> Any:
    """A temporary folder on the filesystem of ``dst`` (its nearest existing ancestor), for building outputs."""
    anchor = Path(dst)
    while not anchor.parent.exists() and anchor.parent != anchor:
        anchor = anchor.parent
    return scratch_dir(anchor)


@contextlib.contextmanager
def build_scratch(dst: Path, *, src: Path) -> Iterator[Path]:
    """:func:`scratch_near` for building the output of ``src`` bound for ``dst``: a failure that the file system
    caused (a full disk, the file-size limit), even one seen only when a tool reads back a file it wrote cut
    short, is a DestinationError naming ``dst`` (see :func:`llmconv.io.build_failure`), not an internal error.
    """
    from google.protobuf.message import DecodeError

    from llmconv.errors import ConversionError, CorruptInput

    try:
        with scratch_near(dst) as name:
            scratch = Path(name)
            try:
                yield scratch
            except DestinationError as e:
                if e.path is None or scratch.resolve() not in e.path.resolve().parents:
                    raise
                # A step that wrote into the scratch folder (the export of an hf source): name the user's path.
                raise DestinationError(e.bare_message, path=dst, hint=e.hint) from e
            except (OSError, DecodeError, CorruptInput, ConversionError) as e:
                # A corrupt file is the destination's doing only when it is our own output, read back; a tool's
                # failure only with the evidence build_failure asks for.
                if isinstance(e, CorruptInput) and (e.path is None
                                                    or scratch.resolve() not in e.path.resolve().parents):
                    raise
                instead = build_failure(dst, e, scratch=scratch, needed=_size(src))
                if instead is None:
                    raise
                raise instead from e
    except OSError as e:  # making or removing the scratch folder itself
        instead = build_failure(dst, e, scratch=dst.parent, needed=0)
        if instead is None:
            raise
        raise instead from e


def _size(src: Path) -> int:
    total = 0
    for p in input_files(src):
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


def check_sidecar(dst: Path, *, force: bool) -> None:
    """Refuse to overwrite ``DST.data`` (the external data of an ``.onnx`` destination) without ``force``."""
    sidecar = dst.parent / f"{dst.name}.data"
    if (sidecar.exists() or sidecar.is_symlink()) and not force:
        raise DestinationError("destination's external data file exists", path=sidecar,
                               hint="pass --force to replace it")


def onnx_destination(dst: Path, *, what: str) -> bool:
    """Whether an ONNX output goes to a folder (True) or to ``dst`` as a ``.onnx`` file (False).

    Raises:
        UsageError: ``dst`` has the extension of another format (``.safetensors``, ``.bin``, ...).
    """
    from llmconv.errors import UsageError
    from llmconv.formats import registry

    if dst.suffix.lower() == ".onnx" and not dst.is_dir():
        return False
    other = registry.by_extension(dst)
    if other is not None and other.name != "onnx" and not dst.is_dir():
        raise UsageError(f"{what} is an ONNX model and cannot be written as {other.name} ({dst.suffix})", path=dst,
                         hint="give DST a .onnx extension, or a folder")
    return True


def read_config(folder: Path) -> dict[str, Any] | None:
    """``folder/config.json`` parsed, or None when there is none."""
    from llmconv.checkpoint import read_json

    path = folder / "config.json"
    if not path.is_file():
        return None
    parsed = read_json(path, what="config.json")
    return parsed if isinstance(parsed, dict) else None


def copy_companions(folder: Path, out_dir: Path, *, notes: list[str] | None = None) -> list[Path]:
    """Copy config and tokenizer files from ``folder`` into ``out_dir`` (those not there already).

    A file that a link takes out of ``folder`` (or that is no regular file) is not copied; ``notes`` says so.
    """
    from llmconv.formats.hf import outside_reason, skipped_note

    copied: list[Path] = []
    if not folder.is_dir():
        return copied
    skipped: dict[str, None] = {}
    for pattern in COMPANION_PATTERNS:
        for p in sorted(folder.glob(pattern)):
            target = out_dir / p.name
            if target.exists() or p.name.endswith((".onnx", ".onnx.data")) or (p.is_dir() and not p.is_symlink()):
                continue
            reason = outside_reason(folder, p)
            if reason is not None:
                skipped[reason] = None
                continue
            shutil.copyfile(p, target)
            copied.append(target)
    if skipped and notes is not None:
        notes.append(skipped_note(list(skipped)))
    return copied


def install(out_dir: Path, dst: Path, *, folder: bool, force: bool, notes: list[str] | None = None) -> list[Path]:
    """Move a finished (and verified) output from ``out_dir`` into place.

    A folder destination is renamed into place at once. A file destination is the ``.onnx`` file
    (named ``dst.name`` in ``out_dir``) and its external data files: the data files go first, each
    renamed atomically, and the model that refers to them last, all with SIGINT/SIGTERM held, so an
    interrupt never leaves the old model beside new data. With ``force``, the replaced model's data
    files go too, but only those its own record says llmconv wrote for it (``notes`` names the others,
    which stay).

    Returns:
        The paths written.
    """
    names = sorted(p.name for p in out_dir.iterdir())
    if folder:
        with atomic_output(dst, folder=True, force=force) as tmp:
            for name in names:
                os.replace(out_dir / name, tmp / name)
        return [dst / n for n in names]
    from llmconv.transforms.graph import remove_replaced_data, replaced_data_files

    model = dst.name
    order = [n for n in names if n != model] + [model]
    check_replaceable(dst, folder=False, force=force)  # before any data file is replaced
    old, left = replaced_data_files(dst) if force else ([], [])
    written = [dst.parent / n for n in order]
    before_commit()
    with held_signals():
        for name in order:
            with atomic_output(dst.parent / name, folder=False, force=force or name != model) as tmp:
                os.replace(out_dir / name, tmp)
        shared = remove_replaced_data(old, written)
    kept = {p.resolve() for p in written}
    left = [p for p in left if p not in kept]
    if left and notes is not None:
        notes.append(f"the replaced {dst.name} used data files that llmconv did not record writing for it "
                     f"({', '.join(p.name for p in left)}); they were left in place")
    if shared and notes is not None:
        notes.extend(f"kept {p.name}, the replaced {dst.name}'s data file: {reader.name} beside it reads it too"
                     for p, reader in shared.items())
    return written


def rename_paths(report: Any, renames: dict[Path, Path]) -> None:
    """Name the user's paths, not our temporary ones, in a verification report's notes and reasons."""
    pairs = sorted(((str(a), str(b)) for a, b in renames.items()), key=lambda kv: -len(kv[0]))

    def fix(text: str) -> str:
        for old, new in pairs:
            text = text.replace(old, new)
        return text

    report.notes = [fix(n) for n in report.notes]
    for check in report.checks:
        check.reason = fix(check.reason)
