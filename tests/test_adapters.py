"""LoRA adapters that do not fit (issue 14): `llmconv merge BASE ADAPTER DST` refuses each with exit 2 and one line
naming the module or key and the mismatch, before anything is written; and llmconv.adapters' reading of PEFT's
per-module ranks, alphas and scales, checked against PEFT itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fixtures.make_fixtures import tiny_config
from llmconv import adapters

WEIGHTS = "adapter_model.safetensors"
Q_PROJ_0 = "model.layers.0.self_attn.q_proj"


def edit_config(folder: Path, **changes: object) -> Path:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))
    return folder


def drop_tensors(folder: Path, *, containing: str) -> list[str]:
    """Rewrite the adapter's safetensors file without the tensors whose name contains ``containing``."""
    path = folder / WEIGHTS
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    dropped = sorted(k for k in tensors if containing in k)
    assert dropped, containing
    save_file({k: v for k, v in tensors.items() if k not in dropped}, path, metadata={"format": "pt"})
    return dropped


def refused(cli, base: Path, adapter: Path, tmp_path: Path) -> str:
    """`llmconv merge BASE ADAPTER DST` exits 2 with one line on stderr, and leaves nothing beside DST."""
    out = tmp_path / "out"
    out.mkdir(parents=True)
    dst = out / "merged"
    r = cli("merge", base, adapter, dst)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert not dst.exists() and list(out.iterdir()) == []
    return lines[0]


def test_adapter_for_another_architecture(cli, fx, tmp_path):
    msg = refused(cli, fx("llama-hf"), fx("gpt2-lora"), tmp_path)
    assert "transformer.h.0.attn.c_attn" in msg and "the base has no weight" in msg and "llama-hf" in msg


def test_adapter_for_another_hidden_size(cli, fx, tmp_path):
    import peft
    import transformers as tf

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.head_dim = 32, 64, 8
    torch.manual_seed(0)
    model = peft.get_peft_model(tf.LlamaForCausalLM(config), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "small-lora")
    msg = refused(cli, fx("llama-hf"), tmp_path / "small-lora", tmp_path)
    assert Q_PROJ_0 in msg and "[64, 64]" in msg and "[32, 32]" in msg, msg


def test_target_module_the_base_lacks(cli, fx_copy, fx, tmp_path):
    ad = fx_copy("llama-lora")
    targets = json.loads((ad / "adapter_config.json").read_text())["target_modules"]
    edit_config(ad, target_modules=[*targets, "foo_proj"])
    msg = refused(cli, fx("llama-hf"), ad, tmp_path)
    assert "'foo_proj'" in msg and "no module" in msg, msg


def test_missing_lora_b(cli, fx_copy, fx, tmp_path):
    ad = fx_copy("llama-lora")
    (gone,) = drop_tensors(ad, containing=f"{Q_PROJ_0}.lora_B")
    msg = refused(cli, fx("llama-hf"), ad, tmp_path)
    assert "missing adapter weight" in msg and gone in msg, msg


def test_targeted_module_without_weights(cli, fx_copy, fx, tmp_path):
    ad = fx_copy("llama-lora")
    assert len(drop_tensors(ad, containing="k_proj")) == 4  # A and B, two layers
    msg = refused(cli, fx("llama-hf"), ad, tmp_path)
    assert "missing adapter weight" in msg and "model.layers.0.self_attn.k_proj" in msg, msg
    assert "model.layers.1.self_attn.k_proj" in msg


@pytest.mark.parametrize(("changes", "named"), [
    ({"peft_type": "IA3"}, "IA3"),
    ({"lora_bias": True}, "lora_bias"),
    ({"use_magic_update": True}, "use_magic_update"),
])
def test_not_plain_lora(cli, fx_copy, fx, tmp_path, changes, named):
    ad = edit_config(fx_copy("llama-lora"), **changes)
    msg = refused(cli, fx("llama-hf"), ad, tmp_path)
    assert named in msg, msg


def test_dora(cli, fx, tmp_path):
    msg = refused(cli, fx("llama-hf"), fx("llama-lora-dora"), tmp_path)
    assert "DoRA" in msg, msg


def test_rank_disagrees_with_config(cli, fx_copy, fx, tmp_path):
    ad = edit_config(fx_copy("llama-lora"), r=8)
    msg = refused(cli, fx("llama-hf"), ad, tmp_path)
    assert "model.layers.0.mlp.down_proj" in msg and "rank 4" in msg and "r=8" in msg, msg


def test_arguments_swapped(cli, fx, tmp_path):
    msg = refused(cli, fx("llama-lora"), fx("llama-lora"), tmp_path)
    assert "BASE must be a Hugging Face model folder" in msg and "adapter" in msg, msg
    msg = refused(cli, fx("llama-hf"), fx("llama-hf"), tmp_path / "again")
    assert "not a PEFT adapter folder" in msg and "llama-hf" in msg, msg


def test_unknown_key_without_a_value_is_accepted(fx_copy):
    ad = edit_config(fx_copy("llama-lora"), use_magic_update=None, magic_config={})
    opened = adapters.open_adapter(ad)
    try:
        assert len(opened.modules) == 14
    finally:
        opened.close()


def test_pattern_value_matches_peft():
    from peft.utils.other import get_pattern_key

    patterns = {"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 3, "self_attn.v_proj": 5, "up": 7}
    modules = [f"model.layers.{i}.{m}" for i in range(2) for m in
               ("mlp.down_proj", "mlp.up_proj", "mlp.gate_proj", "self_attn.q_proj", "self_attn.v_proj",
                "self_attn.k_proj")] + ["down_proj", "xdown_proj", "model.layers.0.mlp.down_proj.extra"]
    for module in modules:
        peft_value = patterns.get(get_pattern_key(patterns.keys(), module), -1)
        assert adapters.pattern_value(patterns, module, -1) == peft_value, module
    assert adapters.pattern_value({}, "model.layers.0.mlp.down_proj", 4) == 4


def test_rslora_scales(fx):
    import peft

    from fixtures.make_fixtures import tiny_model

    path = fx("llama-lora-rs")
    ad = adapters.open_adapter(path)
    try:
        down, o_proj = ad.modules["model.layers.0.mlp.down_proj"], ad.modules["model.layers.1.self_attn.o_proj"]
        assert (down.rank, down.alpha) == (2, 16) and down.scale == pytest.approx(16 / math.sqrt(2), rel=1e-12)
        assert (o_proj.rank, o_proj.alpha) == (8, 3) and o_proj.scale == pytest.approx(3 / math.sqrt(8), rel=1e-12)
        q = ad.modules[Q_PROJ_0]
        assert (q.rank, q.alpha) == (8, 16) and q.scale == pytest.approx(16 / math.sqrt(8), rel=1e-12)
        # The scales PEFT itself puts on each layer, for every module.
        model = peft.PeftModel.from_pretrained(tiny_model("llama"), str(path))
        scales = {name.removeprefix("base_model.model."): m.scaling["default"] for name, m in model.named_modules()
                  if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
        assert scales.keys() == ad.modules.keys()
        for name, lm in ad.modules.items():
            assert lm.scale == pytest.approx(scales[name], rel=1e-12), name
    finally:
        ad.close()


def test_plain_scale_is_alpha_over_r(fx):
    ad = adapters.open_adapter(fx("llama-lora"))
    try:
        assert {(lm.rank, lm.alpha, lm.scale) for lm in ad.modules.values()} == {(4, 8.0, 2.0)}
    finally:
        ad.close()


@pytest.mark.parametrize("target", ["wte", "lm_head"])
def test_lora_on_a_tied_weight(cli, fx, tmp_path, target):
    """GPT-2 ties lm_head to wte and stores one of them: a LoRA on either is refused by name, before writing."""
    from fixtures.adapters import make_adapter

    adapter = make_adapter("gpt2", tmp_path / "ad", target_modules=[target], fan_in_fan_out=False)
    msg = refused(cli, fx("gpt2-hf"), adapter, tmp_path)
    assert "ties" in msg and f"{target}.weight" in msg


def test_a_base_rewriting_initialisation(cli, fx, tmp_path):
    """PiSSA's adapter is an update to the residual base PEFT computes on load, not to the base given."""
    from fixtures.adapters import make_adapter

    adapter = make_adapter("llama", tmp_path / "ad", target_modules=["q_proj"], init_lora_weights="pissa")
    msg = refused(cli, fx("llama-hf"), adapter, tmp_path)
    assert "init_lora_weights='pissa'" in msg and "rewriting the base" in msg


def test_non_finite_adapter_values(cli, fx_copy, fx, tmp_path):
    folder = fx_copy("llama-lora")
    path = folder / WEIGHTS
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    name = f"base_model.model.{Q_PROJ_0}.lora_B.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    msg = refused(cli, fx("llama-hf"), folder, tmp_path)
    assert name in msg and "NaN" in msg


def test_encoder_decoder_verification_refused_before_writing(cli, fx, tmp_path):
    from fixtures.adapters import make_adapter

    adapter = make_adapter("t5", tmp_path / "ad", target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    msg = refused(cli, fx("t5-hf"), adapter, tmp_path)
    assert "encoder-decoder" in msg and "--no-verify" in msg


def test_fp16_base_merged_past_its_range(cli, fx, fx_copy, tmp_path):
    """A merged value beyond float16's range would be written as inf: refused, naming the tensor."""
    from llmconv.conversion import convert

    base = tmp_path / "f16"
    convert(fx("llama-hf"), base, dtype="fp16")
    folder = fx_copy("llama-lora")
    path = folder / WEIGHTS
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    tensors[f"base_model.model.{Q_PROJ_0}.lora_B.weight"] *= 1e7
    save_file(tensors, path, metadata={"format": "pt"})
    msg = refused(cli, base, folder, tmp_path)
    assert f"{Q_PROJ_0}.weight" in msg and "float16" in msg and "inf" in msg
