"""hf folder -> GGUF (float and llama.cpp's block types) -> safetensors / hf, with the checks that gate each output:
tensors read back through llmconv's reader, and the model run through transformers' own GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llmconv.formats import gguf_arch, registry
from llmconv.formats.gguf import name_map, plan
from llmconv.verification.weights import compare_quantized

ROOT = Path(__file__).resolve().parents[2]
TRAINED_GPT2 = ROOT / "fixtures" / "models" / "trained-gpt2"
TRAINED_LLAMA = ROOT / "fixtures" / "models" / "trained-llama"


def run_json(cli, *args: object, code: int = 0) -> dict:
    r = cli(*args, "--json")
    assert r.exit_code == code, (r.exit_code, r.stdout[-2000:], r.stderr[-2000:])
    return json.loads(r.stdout)


def refused(cli, *args: object) -> str:
    r = cli(*args)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_float_gguf_round_trips_bit_exact_and_runs_in_transformers(cli, fx, tmp_path, kind):
    src = fx(f"{kind}-hf-bpe")
    out = tmp_path / f"{kind}.gguf"
    report = run_json(cli, "convert", src, out)
    assert report["destination_format"] == "gguf" and report["verified"]
    assert report["gguf_types"] == {"F32": report["tensors"]}
    # Gated twice: every tensor read back bit-exact, and the model run by transformers' GGUF loader.
    weights = report["weights_verification"]
    assert weights["ok"] and all(c["equal"] for c in weights["checks"])
    v = report["verification"]
    assert v["mode"] == "outputs" and v["profile"] == "fp32"
    assert "GGUF loader" in v["runners"]["candidate"]
    assert {c["name"] for c in v["checks"]} >= {"logits", "decode.cache", "generation"}
    meta = run_json(cli, "inspect", out)["gguf_metadata"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert "1024 items" in meta["tokenizer.ggml.tokens"] and "767 items" in meta["tokenizer.ggml.merges"]

    back = tmp_path / "back.safetensors"
    run_json(cli, "convert", out, back)
    same = run_json(cli, "verify", src / "model.safetensors", back, "--mode", "weights")
    assert same["ok"] and same["profile"] == "exact"


def test_llama_q_k_rows_are_permuted_as_llama_cpp_expects(fx, tmp_path, cli):
    """transformers' GGUF loader (not llmconv) undoes the permutation: its logits equal the checkpoint's."""
    from transformers import AutoModelForCausalLM

    src = fx("llama-hf-bpe")
    out = tmp_path / "m.gguf"
    run_json(cli, "convert", src, out, "--no-verify")
    with registry.open_checkpoint(src) as ck:
        q = ck.tensor("model.layers.0.self_attn.q_proj.weight")
    stored = gguf.GGUFReader(out).tensors
    raw = next(t for t in stored if t.name == "blk.0.attn_q.weight")
    assert not torch.equal(torch.from_numpy(np.array(raw.data)), q)  # rows interleaved per head
    ids = torch.tensor([[5, 17, 300, 2, 999, 41]])
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    # What from_pretrained(tmp_path, gguf_file="m.gguf") does (without needing accelerate): transformers' config and
    # its load_gguf_checkpoint, which dequantizes, names and un-permutes by its own code.
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cand = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf")).eval()
    loaded = cand.load_state_dict(load_gguf_checkpoint(str(out), return_tensors=True, model_to_load=cand)["tensors"],
                                  strict=False)
    assert loaded.missing_keys == [] and loaded.unexpected_keys == []
    with torch.inference_mode():
        assert torch.equal(ref(ids).logits, cand(ids).logits)


def test_gguf_to_hf_folder_loads_and_generates_like_the_source(cli, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gg = tmp_path / "l.gguf"
    run_json(cli, "convert", TRAINED_LLAMA, gg, "--no-verify")
    back = tmp_path / "back"
    report = run_json(cli, "convert", gg, back)
    assert report["destination_format"] == "hf" and report["verified"]
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in back.iterdir()}
    assert run_json(cli, "verify", TRAINED_LLAMA, back, "--mode", "weights")["ok"]
    ids = AutoTokenizer.from_pretrained(back)("And God said", return_tensors="pt").input_ids
    assert ids.tolist()[0] == AutoTokenizer.from_pretrained(TRAINED_LLAMA)("And God said").input_ids
    gen = {}
    for name, folder in (("source", TRAINED_LLAMA), ("back", back)):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        gen[name] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                   pad_token_id=0).tolist()
    assert gen["source"] == gen["back"]


def test_fp16_and_q8_0_keep_1d_tensors_in_float32(cli, fx, tmp_path):
    src = fx("qwen2-hf-bpe")
    f16 = run_json(cli, "convert", src, tmp_path / "h.gguf", "--dtype", "fp16")
    with registry.open_checkpoint(src) as ck:
        two_d = sum(1 for n, i in ck.infos.items() if len(i.shape) == 2 and n not in ck.aliases)
        one_d = sum(1 for n, i in ck.infos.items() if len(i.shape) == 1)
    assert f16["gguf_types"] == {"F16": two_d, "F32": one_d} and f16["verification"]["profile"] == "fp16"
    q8 = run_json(cli, "quantize", src, tmp_path / "q.gguf", "--target", "cpu")  # auto: q8_0
    assert q8["method"] == "q8_0" and q8["profile"] == "int8" and q8["destination_format"] == "gguf"
    assert q8["options"]["gguf_types"] == {"Q8_0": two_d, "F32": one_d}
    assert any("auto chose q8_0" in n for n in q8["notes"])
    assert q8["size_after"] < 0.35 * q8["size_before"]
    # weights mode: every value on its block's grid
    w = run_json(cli, "verify", src, tmp_path / "q.gguf", "--mode", "weights")
    grid = [c for c in w["checks"] if c.get("gguf_type") == "Q8_0"]
    assert w["ok"] and len(grid) == two_d and max(c["max_steps"] for c in grid) <= 0.6


@pytest.mark.parametrize("method", ["q4_0", "q5_1"])
def test_4_and_5_bit_blocks_on_the_trained_gpt2(cli, tmp_path, method):
    report = run_json(cli, "quantize", TRAINED_GPT2, tmp_path / "q.gguf", "--target", "cpu", "--method", method,
                      "--text", ROOT / "fixtures" / "data" / "heldout.txt")
    assert report["verified"] and report["profile"] == "int4"
    # GPT-2's head is its embedding (tied): kept at Q8_0, as llama-quantize keeps the head above 4/5 bits.
    assert report["options"]["gguf_types"][method.upper()] == 8
    assert report["options"]["gguf_types"]["Q8_0"] == 1
    checks = {c["name"]: c for c in report["verification"]["checks"]}
    assert checks["perplexity"]["passed"] and checks["generation"]["passed"]


def _unpermuted_llama_gguf(src: Path, out: Path) -> None:
    """A Llama GGUF whose Q/K rows are in the checkpoint's order: what a converter that forgets llama.cpp's
    permutation writes. Everything else as llmconv writes it."""
    with registry.open_checkpoint(src) as ck:
        _, arch, entries, _ = plan(ck, None)
        w = gguf.GGUFWriter(str(out), "llama")
        for _key, method, value in gguf_arch.hyper_parameters(arch, ck.config):
            getattr(w, method)(value)
        w.add_vocab_size(ck.config["vocab_size"])
        for e in entries:
            w.add_tensor(e.name, ck.tensor(e.src_name).to(torch.float32).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def test_a_gguf_without_the_q_k_permutation_fails_both_checks(cli, fx, tmp_path):
    src = fx("llama-hf-bpe")
    bad = tmp_path / "bad.gguf"
    _unpermuted_llama_gguf(src, bad)
    outputs = run_json(cli, "verify", src, bad, code=1)
    assert outputs["mode"] == "outputs" and not outputs["ok"]
    weights = run_json(cli, "verify", src, bad, "--mode", "weights", code=1)
    failed = {c["name"] for c in weights["checks"] if not c["passed"]}
    assert failed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qk"}


def test_grid_check_catches_a_value_two_steps_off():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    q = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                                gguf.GGMLQuantizationType.Q8_0))
    assert compare_quantized("w", w, q, "Q8_0").passed
    step = float(w[1, 32:].abs().max()) / 127
    off = q.clone()
    off[1, 40] += 2 * step
    check = compare_quantized("w", w, off, "Q8_0")
    assert not check.passed and check.figures["over"] == 1 and 1.4 < check.figures["max_steps"] < 2.6


def test_refusals_name_the_problem_and_write_nothing(cli, fx, tmp_path):
    out = tmp_path / "o.gguf"
    assert "config.json" in refused(cli, "convert", fx("llama-hf-bpe") / "model.safetensors", out)
    assert "WordLevel" in refused(cli, "convert", fx("llama-hf"), out)  # no vocabulary llama.cpp can run
    assert "does not write BertModel as GGUF" in refused(cli, "convert", fx("bert-hf"), out)
    assert "does not apply to a GGUF destination" in refused(cli, "quantize", fx("llama-hf-bpe"), out, "--target",
                                                             "cpu", "--method", "int4")
    assert "needs a .gguf destination" in refused(cli, "quantize", fx("llama-hf-bpe"), tmp_path / "o.onnx",
                                                  "--target", "cpu", "--method", "q8_0")
    assert "--target cpu" in refused(cli, "quantize", fx("llama-hf-bpe"), out, "--target", "gpu")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_name_map_covers_every_tensor_of_each_architecture(fx):
    for kind in ("llama", "qwen2", "qwen3", "mistral", "gpt2"):
        with registry.open_checkpoint(fx(f"{kind}-hf-bpe")) as ck:
            _, arch = gguf_arch.arch_for(ck.config)
            mapped = name_map(arch, ck.config, ck.canonical_names())
            assert all(v is not None for v in mapped.values()), kind
            assert len(set(mapped.values())) == len(mapped), kind


def test_a_bf16_model_comes_back_bf16_bit_exact(cli, fx, tmp_path):
    """GGUF keeps norms in F32 (as llama.cpp does); read back, they are the model's bf16 again, and config.json says
    bfloat16."""
    bf16 = tmp_path / "bf16"
    run_json(cli, "convert", fx("qwen2-hf-bpe"), bf16, "--dtype", "bf16")
    report = run_json(cli, "convert", bf16, tmp_path / "m.gguf")
    assert set(report["gguf_types"]) == {"BF16", "F32"} and report["verification"]["profile"] == "bf16"
    back = tmp_path / "back"
    report = run_json(cli, "convert", tmp_path / "m.gguf", back)
    assert any("read back as bfloat16" in n for n in report["notes"])
    assert run_json(cli, "verify", bf16, back)["ok"]
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
