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


# ---- every dtype torch.save stores ----

def _sample_any(dtype: torch.dtype) -> torch.Tensor:
    """A [2, n] tensor of ``dtype`` with varied bytes; a quantized dtype gets a real quantizer."""
    import warnings

    from tests.formats.test_safetensors import _sample

    with warnings.catch_warnings():  # torch warns that quantized dtypes are deprecated
        warnings.simplefilter("ignore")
        if torch.empty(0, dtype=dtype).is_quantized:
            return torch.quantize_per_tensor(torch.linspace(-1, 1, 16).view(2, 8), 0.05, 3, dtype)
    return _sample(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return (t.int_repr() if t.is_quantized else t).contiguous().view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_q = not a.is_quantized or (a.q_scale(), a.q_zero_point()) == (b.q_scale(), b.q_zero_point())
    return (a.dtype, a.shape) == (b.dtype, b.shape) and same_q and torch.equal(_bits(a), _bits(b))


def _torch_saved_dtypes() -> list[torch.dtype]:
    """Every dtype whose tensors torch.save writes and torch.load(weights_only=True) reads back, found by trying."""
    import io
    import warnings

    found = []
    for dtype in sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str):
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                t = _sample_any(dtype)
                torch.save(t, buf)
                buf.seek(0)
                back = torch.load(buf, weights_only=True)
            except (RuntimeError, KeyError, TypeError):  # int1..int7, uint1..uint7: torch.save has no storage
                continue
        assert _same(back, t), dtype
        found.append(dtype)
    return found


def test_every_safetensors_dtype_converts_to_a_state_dict_torch_loads_bit_for_bit(tmp_path, cli):
    """float8 (E8M0 and FNUZ included), packed float4 and uint16/32/64: safetensors -> .bin, as a file and as a
    folder; torch.load(weights_only=True) reads every tensor back bit for bit, and so does llmconv."""
    from safetensors.torch import _SIZE, load_file, save_file

    src = tmp_path / "all.safetensors"
    save_file({f"t_{str(dt).removeprefix('torch.')}": _sample_any(dt) for dt in _SIZE}, src)
    tensors = load_file(src)
    for dst, more in ((tmp_path / "o" / "c.bin", ()), (tmp_path / "dir", ("--to", "pytorch"))):
        r = cli("convert", src, dst, *more)
        assert r.exit_code == 0, r.output
        out = torch.load(dst if dst.suffix else dst / "pytorch_model.bin", weights_only=True)
        assert sorted(out) == sorted(tensors)
        assert [n for n, t in tensors.items() if not _same(out[n], t)] == []
    back = tmp_path / "back.safetensors"
    assert cli("convert", tmp_path / "o" / "c.bin", back).exit_code == 0
    again = load_file(back)
    assert [n for n, t in tensors.items() if not _same(again[n], t)] == []


def test_every_dtype_torch_save_stores_is_read_and_written_bit_for_bit(tmp_path, cli):
    """A torch.save file of every dtype torch.load(weights_only=True) reads (bits, complex32 and quantized too),
    each as a slice at an offset of a shared storage: inspect reads it, llmconv's tensors are torch's, and both
    a .bin and (for the dtypes safetensors holds) a .safetensors written from it hold the same bytes."""
    from safetensors.torch import _SIZE, load_file

    dtypes = _torch_saved_dtypes()
    assert {torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz,
            torch.float8_e8m0fnu, torch.float4_e2m1fn_x2, torch.uint16, torch.uint32, torch.uint64,
            torch.bool, torch.complex64, torch.qint8} <= set(dtypes)
    sd = {}
    for dt in dtypes:
        base, name = _sample_any(dt), str(dt).removeprefix("torch.")
        sd[f"{name}.whole"] = base
        if not base.is_quantized:  # rows 0 and 1 as two tensors of one storage, the second at an offset
            rows = base.reshape(2, -1)
            sd[f"{name}.whole"], sd[f"{name}.row1"] = rows[0], rows[1]
    path = tmp_path / "all.bin"
    torch.save(sd, path)
    ref = torch.load(path, weights_only=True)
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["dtypes"]) == {str(dt).removeprefix("torch.") for dt in dtypes}
    with registry.open_checkpoint(path) as src:
        assert [n for n, t in ref.items() if not _same(src.tensor(n), t)] == []
    out = tmp_path / "out.bin"
    assert cli("convert", path, out).exit_code == 0
    written = torch.load(out, weights_only=True)
    assert sorted(written) == sorted(ref) and [n for n, t in ref.items() if not _same(written[n], t)] == []

    st_path = tmp_path / "st.bin"
    torch.save({n: t for n, t in sd.items() if t.dtype in _SIZE}, st_path)
    r = cli("convert", st_path, tmp_path / "st.safetensors")
    assert r.exit_code == 0, r.output
    st = load_file(tmp_path / "st.safetensors")
    assert len(st) == 2 * len(_SIZE) and [n for n, t in st.items() if not _same(t, ref[n])] == []


def test_tensors_made_in_memory_are_spilled_and_stored_in_every_dtype(tmp_path):
    """The writer's other path (a cast, a source that is not mapped): bytes go through a scratch file and are
    mapped back; a quantized tensor keeps its quantizer."""
    from llmconv.checkpoint import TensorInfo, TensorSource

    tensors = {str(dt).removeprefix("torch."): _sample_any(dt) for dt in _torch_saved_dtypes()}
    src = TensorSource(format="test", path=tmp_path, loader=lambda n: tensors[n], zero_copy=False,
                       infos={n: TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()})
    dst = tmp_path / "spilled.bin"
    pt_format.write_file(src, list(tensors), dst)
    out = torch.load(dst, weights_only=True)
    assert [n for n, t in tensors.items() if not _same(out[n], t)] == []


@pytest.mark.skipif(not hasattr(torch, "int4"), reason="this torch has no int4 dtype")
@pytest.mark.parametrize("folder", [False, True])
def test_a_dtype_torch_save_cannot_store_is_refused_naming_the_tensor_and_the_destination(tmp_path, folder):
    """torch.int4 has no storage torch.save can write: the refusal names the tensor, its dtype and DST (never the
    temporary name the writer was given), and leaves nothing behind."""
    from llmconv.checkpoint import TensorInfo, TensorSource
    from llmconv.io import atomic_output

    t = torch.zeros(4, dtype=torch.uint8).view(torch.int4)
    with pytest.raises(KeyError):  # torch itself cannot
        torch.save({"w": t}, tmp_path / "torch.bin")
    tensors = {"ok": torch.ones(2), "w": t}
    src = TensorSource(format="test", path=tmp_path, loader=lambda n: tensors[n],
                       infos={n: TensorInfo(n, v.dtype, tuple(v.shape)) for n, v in tensors.items()})
    dst = tmp_path / "out" / ("dir" if folder else "c.bin")
    with pytest.raises(Unsupported) as info, atomic_output(dst, folder=folder) as tmp:
        pt_format.FORMAT.write(src, tmp, folder=folder, options=WriteOptions())
    named = dst / "pytorch_model.bin" if folder else dst
    msg = str(info.value)
    assert msg.startswith(f"{named}: tensor 'w' has dtype int4, which a PyTorch state dict cannot hold")
    assert info.value.path == named and "llmconv-tmp" not in msg and "float8_e4m3fn" in msg  # the hint lists
    assert not (tmp_path / "out").exists()


def test_legacy_file_of_a_dtype_torch_cannot_read_back_is_refused_as_such(tmp_path, cli):
    """torch.save(_use_new_zipfile_serialization=False) writes float8 as an untyped storage torch.load cannot read."""
    path = tmp_path / "legacy-f8.pt"
    torch.save({"w": _sample_any(torch.float8_e5m2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(AttributeError):
        torch.load(path, weights_only=True)
    r = cli("inspect", path)
    assert r.exit_code == 2
    assert r.stderr.strip() == (f"error: {path}: tensor 'w' (float8_e5m2) is stored in the legacy (non-zip) format, "
                                "from which torch.load cannot read it back (save it again with torch.save's default "
                                "(zip) format, or as safetensors)")
