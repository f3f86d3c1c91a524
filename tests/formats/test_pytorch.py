"""PyTorch state dicts: safe loading, mapped tensors, tied storage, legacy pickles, shards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from llmconv.errors import CorruptInput, UnsafeInput, Unsupported, UsageError
from llmconv.formats import pytorch as pt_format
from llmconv.formats import registry, sharding
from llmconv.formats.registry import WriteOptions
from tests.formats._maps import mapped_file


class _Payload:
    """Unpickling this would create ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_open_state_dict_with_tied_weights(fx):
    path = fx("gpt2-state-dict.bin")
    ref = torch.load(path, weights_only=True)
    with registry.open_checkpoint(path) as src:
        assert src.format == "pytorch" and src.weights_format == "pytorch"
        assert src.names() == list(ref)
        assert src.aliases == {"lm_head.weight": "transformer.wte.weight"}
        for n, t in ref.items():
            assert torch.equal(src.tensor(n), t)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_open_is_lazy_tensors_are_mapped_from_the_file(fx):
    path = fx("bert.pt")
    with registry.open_checkpoint(path) as src:
        assert src.zero_copy
        t = src.tensor("embeddings.word_embeddings.weight")
        assert mapped_file(t.data_ptr()) == str(path.resolve())


def test_unsafe_pickle_is_refused_even_when_the_env_asks_for_unsafe_loading(fx, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = fx("unsafe.bin")
    with pytest.raises(UnsafeInput) as info:
        registry.open_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: pickle needs more than plain tensors to load (")
    assert "open" in msg.split("(")[1]  # the unsafe global is listed
    assert "nothing in it was run" in msg
    assert not (path.parent / "PWNED").exists()


def test_legacy_pickle_is_read_and_its_unsafe_variant_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(3, 4, generator=g), "b": torch.arange(5)}
    legacy = tmp_path / "legacy.pt"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:1] == b"\x80"
    assert registry.detect(legacy).name == "pytorch"
    with registry.open_checkpoint(legacy) as src:
        assert torch.equal(src.tensor("a"), sd["a"]) and torch.equal(src.tensor("b"), sd["b"])
    marker = tmp_path / "PWNED"
    evil = tmp_path / "legacy-unsafe.pt"
    torch.save({"a": sd["a"], "evil": _Payload(str(marker))}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeInput) as info:
        registry.open_checkpoint(evil)
    msg = str(info.value)
    assert "(io.open)" in msg or "(builtins.open)" in msg
    assert "\x1b" not in msg and "\n" not in msg
    assert not marker.exists()


class _System:
    def __reduce__(self):
        import os

        return (os.system, ("echo PWNED",))


@pytest.mark.parametrize("kind", ["legacy", "plain-pickle", "zip"])
def test_refusal_names_what_the_pickle_wanted(tmp_path, kind, capfd):
    import pickle

    path = tmp_path / f"{kind}.bin"
    obj = {"a": torch.zeros(2), "evil": _System()}
    if kind == "plain-pickle":
        path.write_bytes(pickle.dumps(obj, protocol=4))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=kind == "zip")
    with pytest.raises(UnsafeInput, match=r"pickle needs more than plain tensors to load \(posix\.system\); "
                                          r"nothing in it was run"):
        registry.open_checkpoint(path)
    captured = capfd.readouterr()
    assert "PWNED" not in captured.out and captured.err == ""  # nothing ran, and torch's warnings stay quiet


def test_training_checkpoint_wrapper_is_unwrapped(tmp_path):
    sd = {"w": torch.ones(2, 3)}
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd, "epoch": 3, "lr": 0.1}, path)
    with registry.open_checkpoint(path) as src:
        assert src.names() == ["w"] and torch.equal(src.tensor("w"), sd["w"])


@pytest.mark.parametrize(("obj", "words"), [
    ({"w": torch.ones(2), "step": 5}, "not a state dict: entries ['step'] are not tensors"),
    ([torch.ones(2)], "holds a list, not a state dict of tensors"),
    ({1: torch.ones(2)}, "state dict keys must be strings"),
    ({"s": torch.ones(2, 2).to_sparse()}, "only dense tensors are handled"),
])
def test_not_a_state_dict(tmp_path, obj, words):
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    with pytest.raises(Unsupported) as info:
        registry.open_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ") and words in str(info.value)


def test_truncated_and_garbage_files_are_corrupt_input(fx, tmp_path):
    with pytest.raises(CorruptInput, match=r"truncated\.bin: torch\.load cannot read it: .*central directory"):
        registry.open_checkpoint(fx("truncated.bin"))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(CorruptInput, match="empty.bin: torch.load cannot read it: EOFError"):
        registry.open_checkpoint(empty)
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.ones(100)}, legacy, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(legacy.read_bytes()[:40])
    with pytest.raises((CorruptInput, UnsafeInput)) as info:
        registry.open_checkpoint(cut)
    assert "\n" not in str(info.value)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    import zipfile

    path = tmp_path / "plain.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    assert registry.detect(path).name == "pytorch"
    with pytest.raises(CorruptInput) as info:
        registry.open_checkpoint(path)
    assert "enforce fail" not in str(info.value)
    assert "hello.txt" in str(info.value)


def test_write_keeps_tied_weights_sharing_storage(fx, tmp_path):
    dst = tmp_path / "out.bin"
    with registry.open_checkpoint(fx("gpt2-state-dict.bin")) as src:
        pt_format.FORMAT.write(src, dst, folder=False, options=WriteOptions())
    sd = torch.load(dst, weights_only=True)
    head, wte = sd["lm_head.weight"], sd["transformer.wte.weight"]
    assert head.untyped_storage().data_ptr() == wte.untyped_storage().data_ptr()
    assert len(sd) == 29


def test_write_keeps_non_contiguous_views(fx, tmp_path):
    dst = tmp_path / "out.pt"
    ref = torch.load(fx("noncontiguous.pt"), weights_only=True)
    with registry.open_checkpoint(fx("noncontiguous.pt")) as src:
        assert src.aliases == {}  # q, k, v share a storage at different offsets: not ties
        pt_format.FORMAT.write(src, dst, folder=False, options=WriteOptions())
    out = torch.load(dst, weights_only=True)
    for n, t in ref.items():
        assert torch.equal(out[n], t) and out[n].shape == t.shape
    assert out["transposed"].stride() == ref["transposed"].stride()


def test_sharded_folder_puts_a_tie_beside_its_tensor(fx, tmp_path):
    dst = tmp_path / "shards"
    dst.mkdir()
    with registry.open_checkpoint(fx("gpt2-state-dict.bin")) as src:
        pt_format.FORMAT.write(src, dst, folder=True, options=WriteOptions(shard_size=100_000))
        total = src.total_bytes
    index = json.loads((dst / sharding.PYTORCH_INDEX).read_text())
    assert index["metadata"]["total_size"] == total
    wm = index["weight_map"]
    assert len(wm) == 29 and wm["lm_head.weight"] == wm["transformer.wte.weight"]
    shard = torch.load(dst / wm["lm_head.weight"], weights_only=True)
    assert shard["lm_head.weight"].data_ptr() == shard["transformer.wte.weight"].data_ptr()
    assert registry.detect(dst).name == "pytorch"
    with registry.open_checkpoint(dst) as back:
        assert back.aliases == {"lm_head.weight": "transformer.wte.weight"}
        assert back.details["shards"] == len(set(wm.values()))


def test_single_file_with_too_small_shard_size_is_refused(fx, tmp_path):
    with registry.open_checkpoint(fx("bert.pt")) as src, pytest.raises(UsageError, match="folder destination"):
        pt_format.FORMAT.write(src, tmp_path / "x.bin", folder=False, options=WriteOptions(shard_size=10_000))


def test_pytorch_content_wins_over_a_misleading_extension(fx, tmp_path):
    disguised = tmp_path / "weights.safetensors"
    disguised.write_bytes(Path(fx("bert.pt")).read_bytes())
    assert registry.detect(disguised).name == "pytorch"
    with registry.open_checkpoint(disguised) as src:
        assert "embeddings.word_embeddings.weight" in src.infos
