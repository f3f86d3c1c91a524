"""Hugging Face model folders: ``config.json`` plus weights in safetensors or PyTorch form.

Other files (tokenizer, generation config, README, ...) are carried over unchanged. Weights are
written the way ``save_pretrained`` writes them, so ``from_pretrained`` loads our output folders.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmconv.checkpoint import TensorSource, read_json
from llmconv.errors import CorruptInput, InputError, UnsafeInput
from llmconv.formats import pytorch, safetensors, sharding
from llmconv.formats.registry import Format, WriteOptions, register
from llmconv.io import LINKED_VIEWS, scratch_dir, within_model

# Weight files in the order transformers looks for them.
_WEIGHT_CANDIDATES = (
    (sharding.SAFETENSORS_INDEX, "safetensors"),
    ("model.safetensors", "safetensors"),
    (sharding.PYTORCH_INDEX, "pytorch"),
    ("pytorch_model.bin", "pytorch"),
)


def weight_files(folder: Path) -> tuple[Path, str] | None:
    """The weights transformers would load from ``folder`` and their format, if any."""
    for name, fmt in _WEIGHT_CANDIDATES:
        if (folder / name).is_file():
            return folder / name, fmt
    return None


def outside_reason(folder: Path, p: Path) -> str | None:
    """Why ``p``, a file of the model folder ``folder``, must not be read as part of the model; None if it may.

    The rule of index and external-data paths (``llmconv.io.safe_child``), for links: ``p`` must resolve
    inside ``folder`` (or, in a Hugging Face cache snapshot, into its ``blobs``) and be a regular file. A link
    to ``../secret.txt`` or ``/proc/self/environ`` would copy an outside file into the output; one to a FIFO
    or a device would hang the copy; a loop never resolves.
    """
    rel = p.relative_to(folder) if p.is_relative_to(folder) else Path(p.name)
    try:
        resolved = p.resolve(strict=True)
        mode = os.stat(resolved).st_mode
    except RuntimeError:  # how Python < 3.13 reports a loop
        return f"{rel} is a link that loops"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{rel} is a link that loops"
        return f"{rel} is a link to nothing" if p.is_symlink() else f"{rel} cannot be read ({e.strerror})"
    if not within_model(folder.resolve(), resolved):
        shown = os.readlink(p) if p.is_symlink() else resolved
        return f"{rel} links to {shown}, outside the model's folder"
    if stat.S_ISDIR(mode):
        return f"{rel} is a link to a folder, which is not followed"
    if not stat.S_ISREG(mode):
        return f"{rel} is not a regular file (a FIFO, socket or device)"
    return None


@contextlib.contextmanager
def linked_view(files: dict[str, Path]) -> Iterator[Path]:
    """A temporary folder of links, ``name -> files[name]``, whose links count as inside it for ``outside_reason``.

    For folders llmconv assembles itself (an hf folder without its unsafe files, a bare weights file paired
    with a config): the targets are files the user named or that passed ``outside_reason`` already.
    """
    # Named with our pid (``.llmconv-view.llmconv-scratch-PID-HOST-*``): a killed run's view is removed by the next.
    with scratch_dir(Path(tempfile.gettempdir()) / "llmconv-view") as name:
        view = Path(name)
        for rel, target in files.items():
            (view / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target.resolve(), view / rel)
        key = view.resolve()
        LINKED_VIEWS[key] = frozenset(t.resolve() for t in files.values())
        try:
            yield view
        finally:
            LINKED_VIEWS.pop(key, None)


def skipped_note(reasons: list[str]) -> str:
    """One note for the files of a folder left out of an output, each with its reason."""
    return "not copied into the output: " + "; ".join(reasons)


def _is_weight_file(p: Path) -> bool:
    n = p.name
    return (n.endswith((".safetensors", ".bin", ".pt", ".pth")) or n in (sharding.SAFETENSORS_INDEX,
                                                                        sharding.PYTORCH_INDEX))


def carried_files(folder: Path, *, skipped: list[str] | None = None) -> list[Path]:
    """Files of an hf folder that are not weights: they travel unchanged with a conversion.

    Args:
        folder: the hf folder.
        skipped: receives, for each file left out because ``outside_reason`` refuses it (a link that leaves
            the folder, loops, or reaches a FIFO or device), that reason.
    Returns:
        The files to carry, each inside ``folder`` and regular.
    """
    out = []
    for p in sorted(folder.rglob("*")):
        # Hidden folders (.git of a cloned repo holds every weight again, .cache holds download state) stay.
        if any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]):
            continue
        if (p.parent == folder and _is_weight_file(p)) or p.name.startswith(".llmconv"):
            continue
        if p.is_symlink() or p.is_file():
            reason = outside_reason(folder, p)
            if reason is None:
                out.append(p)
            elif skipped is not None:
                skipped.append(reason)
        elif not p.is_dir() and skipped is not None:
            skipped.append(f"{p.relative_to(folder)} is not a regular file (a FIFO, socket or device)")
    return out


def copy_carried(src: TensorSource, dst: Path) -> list[Path]:
    """Copy ``src``'s carried files (config, tokenizer, README, ...) into the folder ``dst``, at the same relative
    paths; returns the files written."""
    written = []
    root = src.path if src.path.is_dir() else None
    for extra in src.extra_files:
        target = dst / (extra.relative_to(root) if root else Path(extra.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(extra, target)
        written.append(target)
    return written


def check_inside(folder: Path, p: Path, *, what: str) -> None:
    """Refuse a file the model is made of (config, weights, index) that a link takes outside ``folder``.

    Shards named by an index are held to the same rule (``safe_child``); a weights file outside the
    folder can still be converted by naming it directly.
    """
    reason = outside_reason(folder, p)
    if reason is not None:
        raise UnsafeInput(f"{what}: {reason}", path=folder,
                          hint="refusing to read outside the model; copy the file into the folder, or give "
                               "the file itself")


def load_config(folder: Path) -> dict:
    config = read_json(folder / "config.json", what="config.json")
    if not isinstance(config, dict):
        raise CorruptInput("config.json is not a JSON object", path=folder / "config.json")
    return config


_FLOAT_NAMES = {"float32", "float16", "bfloat16", "float64"}


def _record_dtype(config_path: Path, src: TensorSource) -> None:
    """Say in config.json the dtype the weights are now stored in, after a cast (--dtype).

    ``from_pretrained(dtype="auto")`` loads the dtype config.json names: left at float32, a bf16
    folder would load upcast, at twice the memory. The rest of the file is kept as it was.
    """
    import json

    from llmconv.checkpoint import dtype_name

    floats = {dtype_name(i.dtype) for n, i in src.infos.items() if i.dtype.is_floating_point}
    if len(floats) != 1:
        return
    stored = floats.pop()
    config = read_json(config_path, what="config.json")
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    if all(config.get(k) == stored for k in keys) or any(config.get(k) not in (None, *_FLOAT_NAMES) for k in keys):
        return
    for k in keys:
        config[k] = stored
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


class HfFormat(Format):
    name = "hf"
    description = "Hugging Face model folder: config.json + safetensors or PyTorch weights (+ tokenizer files)"
    extensions = ()
    folder_only = True
    priority = 0

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.is_dir() and (path / "config.json").is_file() and weight_files(path) is not None

    def open(self, path: Path) -> TensorSource:
        path = Path(path)
        check_inside(path, path / "config.json", what="the config")
        config = load_config(path)
        found = weight_files(path)
        if found is None:
            raise InputError("config.json but no weights (model.safetensors, pytorch_model.bin or an index)",
                             path=path)
        weights, fmt = found
        check_inside(path, weights, what="the weights")
        reader = safetensors.FORMAT if fmt == "safetensors" else pytorch.FORMAT
        src = reader.open(path if weights.name.endswith(".index.json") else weights)
        src.format = "hf"
        src.path = path
        src.config = config
        src.weights_format = fmt
        skipped: list[str] = []
        src.extra_files = carried_files(path, skipped=skipped)
        if skipped:
            src.details["notes"] = [skipped_note(skipped)]
        src.details.setdefault("shards", len([f for f in src.files if not f.name.endswith(".json")]))
        return src

    def write(self, src: TensorSource, dst: Path, *, folder: bool, options: WriteOptions) -> list[Path]:
        weights_format = options.weights_format or "safetensors"
        writer = safetensors.FORMAT if weights_format == "safetensors" else pytorch.FORMAT
        written = copy_carried(src, dst)
        config = dst / "config.json"
        if config in written and src.details.get("cast_to"):
            _record_dtype(config, src)
        written += writer.write(src, dst, folder=True, options=options)
        return written


FORMAT = register(HfFormat())
