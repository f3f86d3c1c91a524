"""llmconv.checkpoint: tensor infos, tied aliases, casts and the fp16 overflow check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmconv.checkpoint import (
    TensorInfo,
    TensorSource,
    cast_source,
    cast_tensor,
    choose_canonical,
    dtype_name,
    find_aliases,
    read_json,
)
from llmconv.errors import ConversionError, CorruptInput
from llmconv.formats import registry


def test_tensor_info_sizes():
    assert TensorInfo("w", torch.float32, (3, 4)).nbytes == 48
    assert TensorInfo("w", torch.bfloat16, (3, 4)).numel == 12
    assert TensorInfo("s", torch.float16, ()).nbytes == 2
    assert TensorInfo("e", torch.int64, (0, 7)).nbytes == 0
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_name(torch.bool) == "bool"


def test_find_aliases_groups_same_views_only():
    base = torch.randn(8, 4)
    sd = {"lm_head.weight": base, "transformer.wte.weight": base, "first_half": base[:4], "second_half": base[4:],
          "empty_a": torch.zeros(0), "empty_b": torch.zeros(0)}
    sd["copy"] = base.clone()
    assert find_aliases(sd.items()) == {"lm_head.weight": "transformer.wte.weight"}


def test_choose_canonical_keeps_the_embedding_as_transformers_does():
    assert choose_canonical(["lm_head.weight", "model.embed_tokens.weight"]) == "model.embed_tokens.weight"
    assert choose_canonical(["transformer.wte.weight", "lm_head.weight"]) == "transformer.wte.weight"
    assert choose_canonical(["b", "a"]) == "a"
    assert choose_canonical(["x.lm_head.weight", "lm_head.weight"]) == "lm_head.weight"


def _source(tensors: dict[str, torch.Tensor]) -> TensorSource:
    infos = {n: TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    return TensorSource(format="test", path=Path("mem"), infos=infos, loader=lambda n: tensors[n])


def test_cast_source_casts_floats_only_and_reports_them():
    src = _source({"w": torch.tensor([1.0, 2.5]), "h": torch.tensor([1.0], dtype=torch.float16),
                   "ids": torch.arange(3), "mask": torch.tensor([True])})
    view, cast = cast_source(src, torch.float16)
    assert cast == ["w"]
    assert view.infos["w"].dtype == torch.float16
    assert view.tensor("w").dtype == torch.float16
    assert view.tensor("ids").dtype == torch.int64
    assert view.tensor("mask").dtype == torch.bool
    assert view.zero_copy is False
    same, none = cast_source(_source({"ids": torch.arange(3)}), torch.float16)
    assert none == [] and same.infos["ids"].dtype == torch.int64


@pytest.mark.parametrize("value", [65504.0, 65519.0, float("inf"), -float("inf"), float("nan"), -65504.0])
def test_cast_to_fp16_accepts_values_that_stay_finite_or_were_not(value):
    out = cast_tensor("w", torch.tensor([1.0, value]), torch.float16)
    assert out.dtype == torch.float16
    # 65519 rounds down to 65504 (round to nearest); inf and nan stay what they were.
    expected = torch.tensor([1.0, value]).to(torch.float16)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(expected))


@pytest.mark.parametrize(("value", "shown"), [(65520.0, "65520"), (70000.0, "70000"), (-1e6, "1e+06")])
def test_cast_to_fp16_refuses_overflow_naming_tensor_and_magnitude(value, shown):
    with pytest.raises(ConversionError) as info:
        cast_tensor("model.big", torch.tensor([1.0, value, float("nan")]), torch.float16, path=Path("m.bin"))
    msg = str(info.value)
    assert msg.startswith("m.bin: tensor 'model.big' has a value of magnitude " + shown)
    assert "float16 maximum 65504" in msg
    assert "--dtype bf16" in msg


def test_narrowing_fp64_to_fp32_is_checked_too():
    with pytest.raises(ConversionError, match=r"tensor 'd' has a value of magnitude 1e\+300.*float32 maximum"):
        cast_tensor("d", torch.tensor([1e300], dtype=torch.float64), torch.float32)
    # fp16 -> bf16 and bf16 -> fp32 widen the range: nothing to check, nothing refused.
    assert cast_tensor("h", torch.tensor([65504.0], dtype=torch.float16), torch.bfloat16).item() == 65536.0
    assert cast_tensor("b", torch.tensor([3e38], dtype=torch.bfloat16), torch.float32).dtype == torch.float32


def test_read_json_names_the_file(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": 1}))
    assert read_json(good, what="index") == {"a": 1}
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(CorruptInput, match=r"bad\.json: index is not valid JSON"):
        read_json(bad, what="index")
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(CorruptInput, match="not valid JSON"):
        read_json(latin, what="index")


def test_source_totals_count_tied_tensors_once(fx):
    with registry.open_checkpoint(fx("gpt2-state-dict.bin")) as src:
        assert src.aliases == {"lm_head.weight": "transformer.wte.weight"}
        assert len(src.infos) == 29
        assert src.num_parameters == 173_824
        assert src.total_bytes == 173_824 * 4
        assert "lm_head.weight" not in src.canonical_names()


def _bart_source(config: dict | None) -> TensorSource:
    shared = torch.zeros(4, 2)
    names = ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
             "lm_head.weight"]
    sd = dict.fromkeys(names, shared)
    return TensorSource(format="pytorch", path=Path("m"), infos={n: TensorInfo(n, torch.float32, (4, 2)) for n in sd},
                        loader=sd.__getitem__, aliases=find_aliases(sd.items()), config=config)


def test_a_config_rechooses_the_stored_name_as_the_model_class_does(fx):
    from llmconv.checkpoint import left_out_when_tied, retie

    bare = _bart_source(None)  # no config: today's rule, by name
    assert set(bare.aliases.values()) == {"model.decoder.embed_tokens.weight"}
    assert bare.left_out() == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    config = json.loads((fx("bart-hf") / "config.json").read_text())
    bare.config = config  # what the hf reader does after reading the weights
    assert set(bare.aliases.values()) == {"model.shared.weight"}
    assert bare.canonical_names() == ["model.shared.weight"]
    assert _bart_source(config).aliases == bare.aliases == retie(bare.aliases, config)
    assert left_out_when_tied("model.encoder.embed_tokens.weight", "model.shared.weight", config)
    untied = {**json.loads((fx("gpt2-hf") / "config.json").read_text()), "tie_word_embeddings": False}
    assert not left_out_when_tied("lm_head.weight", "transformer.wte.weight", untied)
    assert left_out_when_tied("lm_head.weight", "transformer.wte.weight", None)
    unknown = {"model_type": "no-such-model"}  # the class cannot be read: the name rule and the config's flag
    assert left_out_when_tied("lm_head.weight", "transformer.wte.weight", unknown)
    assert not left_out_when_tied("model.encoder.embed_tokens.weight", "model.shared.weight", unknown)
