"""Shards and index files in the layout transformers reads (``weight_map``, ``metadata.total_size``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from llmconv.checkpoint import TensorInfo, TensorSource, read_json
from llmconv.errors import CorruptInput
from llmconv.io import safe_child

SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"


def plan_shards(names: list[str], infos: dict[str, TensorInfo], max_bytes: int | None) -> list[list[str]]:
    """Split names into shards of at most ``max_bytes`` each, in order, as transformers does.

    A tensor larger than ``max_bytes`` gets a shard of its own.
    """
    if not max_bytes:
        return [list(names)]
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = infos[n].nbytes
        if shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    return shards


def shard_names(stem: str, ext: str, count: int) -> list[str]:
    if count == 1:
        return [f"{stem}{ext}"]
    return [f"{stem}-{i:05d}-of-{count:05d}{ext}" for i in range(1, count + 1)]


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def open_sharded(index_path: Path, *, fmt: str, open_shard: Callable[[Path], TensorSource]) -> TensorSource:
    """Open a sharded checkpoint through its index, checking every shard path and name.

    Raises:
        CorruptInput: the index is malformed, names a missing shard, lists a tensor its shard lacks, or
            leaves out a tensor a shard holds.
        UnsafeInput: a shard path is absolute or leaves the folder.
    """
    index = read_json(index_path, what="index file")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CorruptInput("index has no valid 'weight_map' (tensor name -> shard file)", path=index_path)
    root = index_path.parent
    shard_paths: dict[str, Path] = {}
    for rel in dict.fromkeys(weight_map.values()):
        if not safe_child(root, rel, what="shard", source=index_path).is_file():
            raise CorruptInput(f"index names shard {rel!r}, which is missing", path=index_path,
                               hint="copy the shard beside the index, or regenerate the index")
        # Checked above; kept as written (not resolved) so that files stay under the folder as given.
        shard_paths[rel] = root / rel
    shards = {rel: open_shard(p) for rel, p in shard_paths.items()}
    infos: dict[str, TensorInfo] = {}
    owner: dict[str, TensorSource] = {}
    for name, rel in weight_map.items():
        shard = shards[rel]
        if name not in shard.infos:
            raise CorruptInput(f"index maps tensor {name!r} to shard {rel!r}, which does not hold it",
                               path=index_path, hint="regenerate the index")
        infos[name] = shard.infos[name]
        owner[name] = shard
    for rel, shard in shards.items():
        # transformers loads only what the index lists: a tensor left out would vanish without a word.
        unlisted = [n for n in shard.infos if weight_map.get(n) != rel]
        if unlisted:
            more = f" and {len(unlisted) - 1} more" if len(unlisted) > 1 else ""
            raise CorruptInput(f"shard {rel!r} holds tensor {unlisted[0]!r}{more}, which the index does not map "
                               "to it", path=index_path,
                               hint="regenerate the index, or remove the tensor from the shard")
    aliases: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for shard in shards.values():
        aliases.update({a: c for a, c in shard.aliases.items() if a in infos and c in infos})
        metadata.update(shard.metadata)

    def load(name: str):
        return owner[name].tensor(name)

    src = TensorSource(format=fmt, path=index_path.parent, infos=infos, loader=load, aliases=aliases,
                       metadata=metadata, weights_format=fmt, files=[index_path, *shard_paths.values()],
                       zero_copy=all(s.zero_copy for s in shards.values()),
                       details={"shards": len(shards), "index": index_path.name})
    for s in shards.values():
        src._closers.append(s.close)
    return src
