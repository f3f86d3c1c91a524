"""llmconv.convert as a library: lossless round trips, casts, ties, determinism, atomic and verified outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmconv.checkpoint import TensorSource
from llmconv.conversion import convert
from llmconv.errors import ConversionError, DestinationError, LlmconvError, NotEquivalent, UsageError
from llmconv.formats import registry
from llmconv.formats import safetensors as st_format
from llmconv.formats.registry import Format, WriteOptions

# Every kind of weights output: (suffix or folder, --to, --shard-size).
KINDS = {
    "st": ("m.safetensors", None, None),
    "pt": ("m.pt", None, None),
    "bin": ("m.bin", None, None),
    "st-shards": ("st-dir", "safetensors", "100B"),
    "pt-shards": ("pt-dir", "pytorch", "100B"),
}


def load_all(path: Path) -> dict[str, torch.Tensor]:
    with registry.open_checkpoint(path) as src:
        return {n: src.tensor(n).clone() for n in src.names()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        x, y = a[n], b[n]
        assert (x.dtype, tuple(x.shape)) == (y.dtype, tuple(y.shape)), n
        if x.dtype == torch.bool or x.dtype.itemsize not in (1, 2, 4, 8):
            assert torch.equal(x, y), n
        else:
            view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.dtype.itemsize]
            assert torch.equal(x.contiguous().view(view), y.contiguous().view(view)), n


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".llmconv-" in p.name)


def convert_to(src: Path, folder: Path, kind: str, **kw):
    name, to, shard = KINDS[kind]
    return convert(src, folder / name, to=to, shard_size=shard, **kw), folder / name


@pytest.mark.parametrize("second", list(KINDS))
@pytest.mark.parametrize("first", list(KINDS))
def test_round_trip_every_format_pair_keeps_every_bit(fx, tmp_path, first, second):
    original = load_all(fx("mixed-dtypes.safetensors"))
    report1, mid = convert_to(fx("mixed-dtypes.safetensors"), tmp_path / "a", first)
    report2, out = convert_to(mid, tmp_path / "b", second)
    assert report1.verification.passed and report2.verification.passed
    assert report2.tensors == 12 and report2.parameters == 115
    back = load_all(out)
    assert_bit_identical(original, back)
    specials = back["specials"]
    assert torch.isnan(specials[0]) and specials[1] == float("inf") and specials[2] == -float("inf")
    assert specials[3] == 0 and torch.signbit(specials[3])
    assert specials[4].view(torch.int32).item() == 1  # the smallest subnormal, bit for bit
    assert back["empty"].shape == (0, 4) and back["scalar"].shape == () and back["scalar"].item() == 3.5
    assert back["bf16"].dtype == torch.bfloat16 and back["bool"].tolist() == [True, False, True]
    assert leftovers(tmp_path) == []


def test_safetensors_metadata_is_carried(fx, tmp_path):
    dst = tmp_path / "o.safetensors"
    convert(fx("llama.safetensors"), dst)
    from safetensors import safe_open

    with safe_open(str(dst), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "source": "llmconv-fixture"}
    report = convert(fx("llama.safetensors"), tmp_path / "o.bin")
    assert report.notes == ["PyTorch state dicts hold no metadata: dropped ['format', 'source']"]


def test_same_format_conversion_of_a_library_file_is_byte_identical(fx, tmp_path):
    dst = tmp_path / "model.safetensors"
    convert(fx("gpt2-hf") / "model.safetensors", dst)
    assert dst.read_bytes() == (fx("gpt2-hf") / "model.safetensors").read_bytes()


def test_non_contiguous_tensors(fx, tmp_path):
    ref = torch.load(fx("noncontiguous.pt"), weights_only=True)
    assert not ref["transposed"].is_contiguous()
    convert(fx("noncontiguous.pt"), tmp_path / "o.safetensors")
    out = load_file(tmp_path / "o.safetensors")
    for n, t in ref.items():
        assert torch.equal(out[n], t)


@pytest.mark.parametrize(("dtype", "target"), [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                               ("fp32", torch.float32)])
def test_dtype_casts_floats_and_reports_them(fx, tmp_path, dtype, target):
    original = load_all(fx("mixed-dtypes.safetensors"))
    report = convert(fx("mixed-dtypes.safetensors"), tmp_path / "o.safetensors", dtype=dtype)
    floats = sorted(n for n, t in original.items() if t.dtype.is_floating_point and t.dtype != target)
    assert sorted(report.cast) == floats
    assert report.dtype == str(target).removeprefix("torch.")
    out = load_file(tmp_path / "o.safetensors")
    for n, t in original.items():
        expected = t.to(target) if t.dtype.is_floating_point else t
        assert out[n].dtype == expected.dtype, n
        assert torch.equal(torch.nan_to_num(out[n].float()) if out[n].is_floating_point() else out[n],
                           torch.nan_to_num(expected.float()) if expected.is_floating_point() else expected), n


def test_cast_into_pytorch_output(fx, tmp_path):
    report = convert(fx("gpt2-state-dict.bin"), tmp_path / "o.bin", dtype="bf16")
    assert len(report.cast) == 29 and report.verification.passed
    sd = torch.load(tmp_path / "o.bin", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()


def test_fp16_overflow_is_refused_and_nothing_is_written(fx, tmp_path):
    dst = tmp_path / "o.safetensors"
    with pytest.raises(ConversionError) as info:
        convert(fx("fp16-overflow.safetensors"), dst, dtype="fp16")
    assert "tensor 'big' has a value of magnitude 70000" in str(info.value)
    assert info.value.exit_code == 2
    assert not dst.exists() and leftovers(tmp_path) == []
    convert(fx("fp16-overflow.safetensors"), dst, dtype="bf16")  # bf16 has the range


def test_failed_conversion_over_an_existing_destination_leaves_it_intact(fx, tmp_path):
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"the old model")
    with pytest.raises(ConversionError):
        convert(fx("fp16-overflow.safetensors"), dst, dtype="fp16", force=True)
    assert dst.read_bytes() == b"the old model"
    assert leftovers(tmp_path) == []
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with pytest.raises(ConversionError):
        convert(fx("fp16-overflow.safetensors"), folder, to="safetensors", dtype="fp16", force=True)
    assert [p.name for p in folder.iterdir()] == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_tied_weights_stored_once_in_safetensors_shared_in_pytorch(fx, tmp_path):
    report = convert(fx("gpt2-state-dict.bin"), tmp_path / "o.safetensors")
    assert report.dropped_aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert report.tensors == 28 and report.aliases == {"lm_head.weight": "transformer.wte.weight"}
    out = load_file(tmp_path / "o.safetensors")
    assert "lm_head.weight" not in out and len(out) == 28
    assert report.verification.tied == ["lm_head.weight"] and report.verification.passed
    report = convert(fx("gpt2-state-dict.bin"), tmp_path / "o.bin")
    assert report.dropped_aliases == {}


@pytest.mark.parametrize(("src_name", "dst_name", "to", "shard"), [
    ("gpt2-state-dict.bin", "o.safetensors", None, None),
    ("llama.safetensors", "o.bin", None, None),
    ("mixed-dtypes.safetensors", "o.pt", None, None),
    ("llama.safetensors", "st-shards", "safetensors", "100KB"),
    ("llama.safetensors", "pt-shards", "pytorch", "100KB"),
    ("gpt2-hf-bin", "hf-st", None, None),
    ("gpt2-hf", "hf-pt", "pytorch", "100KB"),
    ("llama-hf-sharded", "hf-fp16", None, None),
])
def test_converting_twice_gives_byte_identical_files(fx, tmp_path, src_name, dst_name, to, shard):
    dtype = "fp16" if dst_name == "hf-fp16" else "keep"
    outs = []
    for run in ("one", "two"):
        dst = tmp_path / run / dst_name
        convert(fx(src_name), dst, to=to, shard_size=shard, dtype=dtype)
        outs.append(dst)
    a, b = outs
    if a.is_file():
        assert a.read_bytes() == b.read_bytes()
    else:
        files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
        assert files_a == sorted(str(p.relative_to(b)) for p in b.rglob("*"))
        for rel in files_a:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


@pytest.mark.parametrize(("size", "shards"), [("2GB", 1), ("500MB", 1), ("300KB", 3), ("100KB", 6)])
def test_shard_sizes(fx, tmp_path, size, shards):
    dst = tmp_path / "out"
    report = convert(fx("llama.safetensors"), dst, to="safetensors", shard_size=size)
    names = sorted(p.name for p in dst.iterdir())
    if shards == 1:
        assert names == ["model.safetensors"]
    else:
        assert len([n for n in names if n.endswith(".safetensors")]) == shards
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == 820_480
        assert len(index["weight_map"]) == 21
    assert len(report.files) == len(names)


def test_shard_size_needs_a_folder_and_says_so_about_dst(fx, tmp_path):
    dst = tmp_path / "o.safetensors"
    with pytest.raises(UsageError) as info:
        convert(fx("llama.safetensors"), dst, shard_size="100KB")
    assert str(info.value).startswith(f"{dst}: --shard-size 100KB needs a folder destination")
    assert not dst.exists() and leftovers(tmp_path) == []


def test_no_verify(fx, tmp_path):
    report = convert(fx("llama.safetensors"), tmp_path / "o.bin", verify=False)
    assert report.verification is None and report.to_json()["verified"] is False
    report = convert(fx("llama.safetensors"), tmp_path / "p.bin")
    assert report.to_json()["verified"] is True and report.to_json()["verification"]["ok"] is True


def test_destination_rules(fx, fx_copy, tmp_path):
    src = fx_copy("llama-hf-sharded")
    with pytest.raises(DestinationError, match="destination is the source itself"):
        convert(src, src, force=True)
    with pytest.raises(DestinationError, match="inside the source folder"):
        convert(src, src / "sub" / "o.safetensors")
    assert not (src / "sub").exists()
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"old")
    with pytest.raises(DestinationError, match=r"destination exists \(pass --force to replace it\)"):
        convert(fx("llama.safetensors"), dst)
    assert dst.read_bytes() == b"old"
    convert(fx("llama.safetensors"), dst, force=True)
    assert load_file(dst).keys() == load_file(fx("llama.safetensors")).keys()


class _LossyFormat(Format):
    """A writer with a bug: it flips one byte of tensor data. Verification must catch it."""

    name = "lossy-test"
    description = "test-only"
    extensions = (".lossy",)

    def sniff(self, path: Path, head: bytes) -> bool:
        return False

    def open(self, path: Path) -> TensorSource:
        return st_format.open_file(path)

    def write(self, src: TensorSource, dst: Path, *, folder: bool, options: WriteOptions) -> list[Path]:
        st_format.write_file(src, src.canonical_names(), dst, metadata={})
        data = bytearray(dst.read_bytes())
        data[-1] ^= 0x01
        dst.write_bytes(bytes(data))
        return [dst]


def test_verification_failure_leaves_nothing_at_the_destination(fx, tmp_path, monkeypatch):
    monkeypatch.setitem(registry._FORMATS, _LossyFormat.name, _LossyFormat())
    dst = tmp_path / "o.lossy"
    with pytest.raises(NotEquivalent) as info:
        convert(fx("llama.safetensors"), dst)
    assert info.value.exit_code == 1
    assert "written output differs from the source" in str(info.value)
    failing = info.value.report.failures()
    assert len(failing) == 1 and failing[0].figures["max_abs"] > 0
    assert not dst.exists() and leftovers(tmp_path) == []
    # --no-verify trusts the writer.
    assert convert(fx("llama.safetensors"), dst, verify=False).verification is None and dst.exists()


def test_library_raises_typed_errors_and_prints_nothing(fx, tmp_path, capsys):
    for bad in ("not-a-model.txt", "truncated.bin", "overlap.safetensors", "index-dotdot-shard", "unsafe.bin"):
        with pytest.raises(LlmconvError) as info:
            convert(fx(bad), tmp_path / "o.safetensors")
        assert info.value.exit_code == 2
        assert str(fx(bad)) in str(info.value)
    with pytest.raises(UsageError, match="unknown --dtype 'int8'"):
        convert(fx("llama.safetensors"), tmp_path / "o.safetensors", dtype="int8")
    with pytest.raises(UsageError, match="cannot read size"):
        convert(fx("llama.safetensors"), tmp_path / "o.safetensors", shard_size="lots")
    convert(fx("llama.safetensors"), tmp_path / "ok.safetensors")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not (tmp_path / "o.safetensors").exists()


def test_public_api_names_stay_functions():
    # The implementing modules are named apart from the API functions: importing a submodule binds
    # its name on the package, which once turned llmconv.convert into a module after any conversion.
    import inspect

    import llmconv
    import llmconv.conversion  # noqa: F401 - what any conversion (or the CLI) does
    import llmconv.inspection  # noqa: F401
    import llmconv.transforms.prune  # noqa: F401
    import llmconv.transforms.quantize  # noqa: F401
    import llmconv.verification.api  # noqa: F401

    for name in ("convert", "inspect", "verify", "quantize", "prune"):
        fn = getattr(llmconv, name)
        assert inspect.isfunction(fn) and fn.__name__ == name, name


# ---- encoder-decoders: tied embeddings stored as save_pretrained stores them (issue 10, item 3) ----------


def _seq2seq_bin(kind: str, folder: Path, **save: object):
    """A tiny seeded ``kind`` model saved as pytorch_model.bin (every tied name present, sharing storage), and
    the names save_pretrained(safe_serialization=True) stores for it."""
    from safetensors import safe_open

    from fixtures.make_fixtures import tiny_model

    model = tiny_model(kind)
    model.save_pretrained(folder / "bin", safe_serialization=False, **save)
    model.save_pretrained(folder / "st", safe_serialization=True)
    with safe_open(str(folder / "st" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    return model, names


def _stored_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            names |= set(st.keys())
    return names


def _same_logits_and_no_missing_keys(model, folder: Path) -> None:
    loaded, info = type(model).from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
    ids, dec = torch.tensor([[0, 5, 6, 7, 2]]), torch.tensor([[2, 5, 6]])
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=dec).logits
        got = loaded.eval()(input_ids=ids, decoder_input_ids=dec).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize(("kind", "shared"), [("bart", "model.shared.weight"), ("t5", "shared.weight"),
                                              ("marian", "model.shared.weight"), ("mbart", "model.shared.weight")])
def test_encoder_decoder_bin_to_safetensors_stores_what_save_pretrained_stores(kind, shared, tmp_path):
    model, expected = _seq2seq_bin(kind, tmp_path)
    report = convert(tmp_path / "bin", tmp_path / "out", to="safetensors")
    assert _stored_names(tmp_path / "out") == expected and shared in expected
    prefix = "model." if shared.startswith("model.") else ""
    tied = [f"{prefix}decoder.embed_tokens.weight", f"{prefix}encoder.embed_tokens.weight", "lm_head.weight"]
    assert report.dropped_aliases == dict.fromkeys(tied, shared)
    assert report.notes == [f"{', '.join(sorted(tied))} are stored once, as {shared}: {type(model).__name__} makes "
                            f"them one parameter with {shared} (tie_weights), so from_pretrained ties them again "
                            "on load"]
    assert report.verification.passed and sorted(report.verification.tied) == sorted(tied)
    _same_logits_and_no_missing_keys(model, tmp_path / "out")


def test_sharded_bart_bin_and_back_from_safetensors(tmp_path):
    model, expected = _seq2seq_bin("bart", tmp_path, max_shard_size="100KB")
    assert (tmp_path / "bin" / "pytorch_model.bin.index.json").is_file()
    convert(tmp_path / "bin", tmp_path / "out", to="safetensors", shard_size="100KB")
    assert _stored_names(tmp_path / "out") == expected
    _same_logits_and_no_missing_keys(model, tmp_path / "out")
    # save_pretrained's safetensors folder -> .bin -> safetensors: the one stored name all the way.
    convert(tmp_path / "st", tmp_path / "as-bin", to="pytorch")
    convert(tmp_path / "as-bin", tmp_path / "again", to="safetensors")
    assert _stored_names(tmp_path / "again") == expected
    _same_logits_and_no_missing_keys(model, tmp_path / "again")


def test_a_bare_bin_without_config_keeps_todays_rule_and_says_why(tmp_path):
    """No config, no class to ask: only the output head is left out (by name), the rest are copies."""
    _seq2seq_bin("bart", tmp_path)
    report = convert(tmp_path / "bin" / "pytorch_model.bin", tmp_path / "o.safetensors")
    assert report.dropped_aliases == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    assert set(load_file(tmp_path / "o.safetensors")) >= {"model.shared.weight", "model.encoder.embed_tokens.weight"}
    assert report.notes[0] == ("lm_head.weight is stored once, as model.decoder.embed_tokens.weight: no config.json: "
                               "an output head sharing the embedding's storage is left out, as save_pretrained "
                               "leaves out a tied head")
    assert any(n.startswith("model.shared.weight shares storage with model.decoder.embed_tokens.weight in the "
                            "source, and safetensors cannot share: it is written as a copy")
               and n.endswith("there is no config.json to say that the model ties it again on load")
               for n in report.notes)


def test_an_untied_head_is_kept(tmp_path):
    """mT5 (tie_word_embeddings false): the embed_tokens are tied to shared, lm_head is a weight of its own."""
    model, expected = _seq2seq_bin("mt5", tmp_path)
    report = convert(tmp_path / "bin", tmp_path / "out", to="safetensors")
    assert "lm_head.weight" in expected and _stored_names(tmp_path / "out") == expected
    assert "lm_head.weight" not in report.dropped_aliases
    _same_logits_and_no_missing_keys(model, tmp_path / "out")


def test_a_conversion_with_nothing_tied_to_explain_builds_no_model_class(tmp_path):
    """Building the architecture on the meta device (transformers' import and the class: ~2 s) happens only
    when tied names are left out or copied; a plain conversion of a 2 MB model took 2 s for nothing."""
    from llmconv import architecture

    trained = Path(__file__).resolve().parents[1] / "fixtures" / "models" / "trained-gpt2"
    architecture._from_json.cache_clear()
    report = convert(trained, tmp_path / "bin", to="pytorch")
    assert report.verification.passed and architecture._from_json.cache_info().misses == 0
