"""``llmconv.merge.merge``: the merged model checked against PEFT itself, not against llmconv's own verifier.

The merged folder is loaded by transformers (``from_pretrained``), run on a fixed batch and compared with PEFT's
unmerged ``PeftModel``; its weights are compared with PEFT's own ``merge_and_unload`` and, for two weighted
adapters, with ``W + sum(w_i * B_i @ A_i * alpha_i / r_i)`` computed here from the adapters' files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmconv.adapters import open_adapter
from llmconv.conversion import convert
from llmconv.merge import merge
from llmconv.verification.outputs import compare_outputs

# Small decode and generation checks: the merge's own gate still runs every kind of check, in a fraction of the time.
FAST = {"decode_steps": 1, "generate": 1}
LLAMA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def merged(fx, tmp_path_factory):
    """``merged(base, adapters, **kw)`` -> (folder, MergeReport), each distinct merge made once per module."""
    made: dict[tuple, tuple[Path, object]] = {}
    root = tmp_path_factory.mktemp("merged")

    def get(base: str | Path, adapters: tuple[str | Path, ...], **kw):
        key = (str(base), tuple(map(str, adapters)), repr(sorted(kw.items())))
        if key not in made:
            dst = root / f"m{len(made)}"
            made[key] = (dst, merge(_path(fx, base), [_path(fx, a) for a in adapters], dst, **{**FAST, **kw}))
        return made[key]

    return get


def _path(fx, name: str | Path) -> Path:
    return name if isinstance(name, Path) else fx(name)


@pytest.fixture(scope="module")
def trained_head(fx, tmp_path_factory) -> Path:
    """llama-lora-embed with its saved-in-full lm_head changed: PEFT saves modules_to_save as a copy of the base's
    head, so in the fixture itself a merge that ignored the copy would look right."""
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("adapters") / "llama-lora-embed-head"
    out.mkdir()
    src = fx("llama-lora-embed")
    (out / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    head = f"{PREFIX}lm_head.weight"
    tensors[head] = tensors[head] + 0.5 * torch.randn(tensors[head].shape, generator=torch.Generator().manual_seed(1))
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return {"input_ids": ids, "attention_mask": mask}


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    return model.eval()


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits.float()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor the folder stores, by name, from safetensors or PyTorch files."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    for f in sorted(folder.glob("*.bin")):
        out.update(torch.load(f, weights_only=True, map_location="cpu"))
    return out


def _peft_reference(base: Path, adapter: Path, batch):
    """(base logits, PEFT unmerged logits, PEFT merge_and_unload state dict)."""
    from peft import PeftModel

    model = _load(base)
    base_logits = _logits(model, batch)
    wrapped = PeftModel.from_pretrained(model, adapter).eval()
    unmerged = _logits(wrapped, batch)
    state = {k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}
    return base_logits, unmerged, state


@pytest.mark.parametrize(("base", "adapter"), [("llama-hf", "llama-lora"), ("qwen2-hf", "qwen2-lora"),
                                               ("gpt2-hf", "gpt2-lora"), ("llama-hf", "llama-lora-rs"),
                                               ("llama-hf", "llama-lora-embed"),
                                               ("llama-hf", "llama-lora-embed, trained head")])
def test_merged_model_matches_peft(fx, merged, trained_head, base, adapter):
    adapter = trained_head if adapter.endswith("trained head") else fx(adapter)
    dst, report = merged(base, (adapter,))
    assert report.verification.passed and report.weights_verification.passed
    cfg = json.loads((fx(base) / "config.json").read_text())
    batch = _batch(cfg["vocab_size"])
    base_logits, unmerged, peft_state = _peft_reference(fx(base), adapter, batch)

    model = _load(dst)
    got = _logits(model, batch)
    assert (got - unmerged).abs().max() < 1e-4
    # The comparison can fail: the adapters move the logits far past the tolerance.
    assert (base_logits - unmerged).abs().max() > 1e-3

    state = model.state_dict()
    assert state.keys() == peft_state.keys()
    for name, t in state.items():
        assert torch.allclose(t, peft_state[name], atol=1e-6, rtol=0), name

    # What no adapter touches is the base's bytes; a LoRA update changes its tensor; a tensor saved in full
    # (modules_to_save) is the adapter's own copy.
    written, original = _weights(dst), _weights(fx(base))
    assert written.keys() == original.keys()
    assert report.merged and set(report.merged) | set(report.replaced) <= written.keys()
    saved = load_file(adapter / "adapter_model.safetensors")
    for name, t in written.items():
        assert t.dtype == original[name].dtype, name
        if name in report.merged:
            assert not torch.equal(t, original[name]), name
        elif name in report.replaced:
            assert torch.equal(t, saved[PREFIX + name]), name
        else:
            assert torch.equal(t, original[name]), name
    if "embed" in adapter.name:
        assert report.replaced == ["lm_head.weight", "model.embed_tokens.weight"]


def test_report_fields_llama(merged):
    _, report = merged("llama-hf", ("llama-lora",))
    assert report.merged == sorted(f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in LLAMA_TARGETS)
    assert len(report.merged) == 14 and report.replaced == []
    assert report.reference.startswith("PEFT 0.21")
    v = report.verification
    assert v.passed and v.mode == "outputs" and v.profile == "fp32"
    names = {c.name for c in v.checks}
    assert {"logits", "decode.prefill", "decode.steps", "decode.consistency", "decode.cache", "generation"} <= names
    assert report.weights_verification.passed
    out = report.to_json()
    assert out["schema"] == "llmconv.merge/1" and out["ok"] is True and out["verified"] is True
    assert out["adapters"][0]["r"] == 4 and out["adapters"][0]["scale"] == 2.0 and out["adapters"][0]["modules"] == 14


def test_llmconv_reference_passes(merged):
    _, report = merged("llama-hf", ("llama-lora",), reference="llmconv")
    assert report.reference.startswith("llmconv's LoRA forward")
    assert report.verification.passed and report.weights_verification.passed
    assert any("--reference llmconv" in n for n in report.notes)


def _lora_deltas(adapter: Path, factor: float) -> dict[str, torch.Tensor]:
    """weight name -> factor * B @ A * alpha / r, read straight from the adapter's files (plain LoRA only)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert not cfg.get("use_rslora") and not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for a_name, a in tensors.items():
        if not a_name.endswith(".lora_A.weight"):
            continue
        b = tensors[a_name.replace(".lora_A.", ".lora_B.")]
        module = a_name[len(PREFIX):-len(".lora_A.weight")]
        out[f"{module}.weight"] = factor * (b @ a) * (cfg["lora_alpha"] / cfg["r"])
    return out


def test_two_weighted_adapters_match_the_formula(fx, merged):
    dst, report = merged("llama-hf", ("llama-lora", "llama-lora-b"), weights=[1.0, 0.5])
    assert report.verification.passed and report.weights_verification.passed
    expected = _weights(fx("llama-hf"))
    base = dict(expected)
    for adapter, factor in (("llama-lora", 1.0), ("llama-lora-b", 0.5)):
        for name, d in _lora_deltas(fx(adapter), factor).items():
            expected[name] = expected[name] + d
    written = _weights(dst)
    assert written.keys() == expected.keys()
    for name, t in written.items():
        assert torch.allclose(t, expected[name], atol=1e-6, rtol=1e-5), name
    assert set(report.merged) == {n for n in written if not torch.equal(written[n], base[n])}
    # q/v carry both adapters: the second one's half weight is there (not 0, not 1).
    q = "model.layers.0.self_attn.q_proj.weight"
    only_a = base[q] + _lora_deltas(fx("llama-lora"), 1.0)[q]
    assert (written[q] - only_a).abs().max() > 1e-3
    assert [a["weight"] for a in report.to_json()["adapters"]] == [1.0, 0.5]


def test_bf16_base_stays_bf16(fx, merged, tmp_path_factory):
    base = tmp_path_factory.mktemp("bf16") / "llama-bf16"
    convert(fx("llama-hf"), base, dtype="bf16")
    dst, report = merged(base, ("llama-lora",))
    assert report.verification.passed and report.weights_verification.passed
    # The written model runs at its dtype's profile, and the merge's arithmetic again at float32 (its tensors before
    # their rounding); the read-back compares the file with those float32 values cast.
    assert report.verification.profile == "bf16" and report.dtype == "bfloat16"
    unrounded = report.unrounded_verification
    assert unrounded is not None and unrounded.passed and unrounded.profile == "fp32"
    assert "before their rounding" in unrounded.extra["runners"]["candidate"]
    assert any("rounding the merged tensors" in n and "changed their update by" in n for n in report.notes)
    assert report.to_json()["unrounded_verification"]["ok"] is True
    written = _weights(dst)
    assert written and all(t.dtype == torch.bfloat16 for t in written.values())
    base_cfg = json.loads((base / "config.json").read_text())
    out_cfg = json.loads((dst / "config.json").read_text())
    assert base_cfg.get("torch_dtype", base_cfg.get("dtype")) == "bfloat16"
    assert out_cfg == base_cfg


def test_pytorch_base_keeps_its_format_or_takes_to(fx, merged, tmp_path_factory):
    base = tmp_path_factory.mktemp("bin") / "llama-bin"
    convert(fx("llama-hf"), base, to="pytorch")
    assert (base / "pytorch_model.bin").is_file()
    reference, _ = merged("llama-hf", ("llama-lora",))
    expected = _weights(reference)

    dst, report = merged(base, ("llama-lora",))
    assert report.weights_format == "pytorch" and report.verification.passed
    assert (dst / "pytorch_model.bin").is_file() and not list(dst.glob("*.safetensors"))
    got = _weights(dst)
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in got)

    dst, report = merged(base, ("llama-lora",), to="safetensors")
    assert report.weights_format == "safetensors" and report.verification.passed
    assert (dst / "model.safetensors").is_file() and not list(dst.glob("*.bin"))
    got = _weights(dst)
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in got)


def test_the_gate_can_fail(fx, merged):
    dst, _ = merged("llama-hf", ("llama-lora",))
    for weight, passes in ((1.0, True), (0.9, False)):
        ad = open_adapter(fx("llama-lora"), weight=weight)
        try:
            v = compare_outputs(fx("llama-hf"), dst, reference_adapters=[ad], decode_steps=0, generate=0)
        finally:
            ad.close()
        assert v.passed is passes, weight
        assert next(c for c in v.checks if c.name == "logits").passed is passes


_WITHOUT_PEFT = """
import json, sys
sys.modules["peft"] = None  # as if PEFT were not installed: `import peft` raises ImportError
from llmconv.merge import merge
from llmconv.errors import MissingDependency
base, adapter, out = sys.argv[1:4]
try:
    merge(base, [adapter], out + "-peft", reference="peft")
    refused = None
except MissingDependency as e:
    refused = str(e)
r = merge(base, [adapter], out, decode_steps=1, generate=1)
print(json.dumps({"refused": refused, "reference": r.reference, "notes": r.notes,
                  "runners": r.verification.extra.get("runners"), "passed": r.verification.passed}))
"""


def test_without_peft_the_reference_is_llmconvs_own_forward(fx, tmp_path):
    """With PEFT absent, ``auto`` runs llmconv's unmerged forward, the report says so, and ``--reference peft`` is
    refused (exit 2's MissingDependency) instead of silently running something else."""
    import subprocess
    import sys

    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_PEFT, str(fx("llama-hf")), str(fx("llama-lora")), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["refused"] and "PEFT" in got["refused"]
    assert not (tmp_path / "merged-peft").exists()
    assert got["reference"] == "llmconv's LoRA forward (adapters unmerged)" and got["passed"]
    assert any("PEFT is not installed" in n for n in got["notes"])
    assert "llmconv's LoRA forward" in got["runners"]["reference"]
    assert (out / "model.safetensors").is_file()


def test_bf16_base_with_tensors_saved_in_full(fx, merged, tmp_path_factory):
    """A float32 lm_head saved in full (modules_to_save) and a LoRA'd embedding saved whole, on a bf16 base: checked
    at float32 before the one rounding, and each written tensor is that value rounded once."""
    base = tmp_path_factory.mktemp("bf16-embed") / "llama-bf16"
    convert(fx("llama-hf"), base, dtype="bf16")
    dst, report = merged(base, ("llama-lora-embed",))
    assert report.verification.passed and report.unrounded_verification.passed
    assert report.unrounded_verification.profile == "fp32"
    assert report.replaced == ["lm_head.weight", "model.embed_tokens.weight"]
    head = load_file(fx("llama-lora-embed") / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
    assert torch.equal(_weights(dst)["lm_head.weight"], head.to(torch.bfloat16))


def test_a_half_precision_merge_missing_an_update_fails(fx, merged, tmp_path_factory):
    """At bf16 the profile of the dtype tolerates more than a small adapter changes; the merge's own check does not:
    a merge that left out the adapter's updates (the base itself as the candidate) fails it."""
    from llmconv.adapters import Fit, unrounded_patch
    from llmconv.formats.hf import FORMAT as HF

    base = tmp_path_factory.mktemp("bf16-gate") / "llama-bf16"
    convert(fx("llama-hf"), base, dtype="bf16")
    small = tmp_path_factory.mktemp("small") / "lora"
    from fixtures.adapters import make_adapter

    make_adapter("llama", small, seed=7, target_modules=["v_proj"])
    with HF.open(base) as src:
        report = compare_outputs(base, base, reference_adapters=[open_adapter(small)], decode_steps=1, generate=1,
                                 profile="fp32", candidate_patch=unrounded_patch(src, Fit()))
    assert not report.passed
    assert any(c.name == "logits" and not c.passed for c in report.checks)


def test_base_stored_without_the_class_prefix(fx, tmp_path):
    """GPT-2's own checkpoint stores h.0.attn.c_attn.weight for the model's transformer.h.0.attn.c_attn.weight
    (transformers adds the prefix on load, and PEFT names the module with it): merged under the stored names."""
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "gpt2-noprefix"
    shutil.copytree(fx("gpt2-hf"), base)
    sd = load_file(base / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in sd.items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    report = merge(base, [fx("gpt2-lora")], tmp_path / "merged", decode_steps=1, generate=1)
    assert report.verification.passed
    assert "h.0.attn.c_attn.weight" in report.merged
    written = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any(k.startswith("transformer.") for k in written)
    with_prefix = merge(fx("gpt2-hf"), [fx("gpt2-lora")], tmp_path / "merged-ref", verify=False)
    reference = load_file(tmp_path / "merged-ref" / "model.safetensors")
    assert with_prefix.merged == [f"transformer.{n}" for n in report.merged]
    assert all(torch.equal(written[k.removeprefix("transformer.")], v) for k, v in reference.items())
