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


def _finish(w: gguf.GGUFWriter) -> None:
    """Write what ``w`` was given (header, metadata, tensors) and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


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
        _finish(w)


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


def _with_extra_tensor(src: Path, dst: Path, name: str, value: np.ndarray) -> None:
    """A copy of the GGUF ``src`` with one more tensor (as llama.cpp's Llama 3.1 files carry rope_freqs.weight)."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), value_type, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), value_type)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.add_tensor(name, value)
    _finish(w)


def test_a_tensor_the_architecture_has_no_place_for_is_never_dropped_silently(cli, fx, tmp_path):
    src = fx("llama-hf-bpe")
    run_json(cli, "convert", src, tmp_path / "m.gguf", "--no-verify")
    extra = tmp_path / "rope.gguf"
    _with_extra_tensor(tmp_path / "m.gguf", extra, "rope_freqs.weight", np.arange(1, 9, dtype=np.float32))
    assert "rope_freqs.weight" in refused(cli, "verify", src, extra)  # transformers would run without it
    assert "has no place for (rope_freqs.weight)" in refused(cli, "convert", extra, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    kept = run_json(cli, "convert", extra, tmp_path / "w.safetensors")  # a weights file keeps it, by its GGUF name
    assert kept["ok"] and any("rope_freqs.weight" in n for n in kept["notes"])


def test_what_llama_cpp_would_refuse_or_misread_is_refused_before_writing(cli, fx, tmp_path):
    import shutil

    out = tmp_path / "o.gguf"
    notok = tmp_path / "notok"
    shutil.copytree(fx("llama-hf-bpe"), notok)
    (notok / "tokenizer.json").unlink()
    assert "no tokenizer.json" in refused(cli, "convert", notok, out)
    for edit, said in ((lambda t: t.__setitem__("normalizer", {"type": "Lowercase"}), "normalizes text (Lowercase)"),
                       (lambda t: t["pre_tokenizer"].__setitem__("add_prefix_space", True), "pre-tokenizer"),
                       (lambda t: t["added_tokens"].append({"id": 1024, "content": "<|x|>", "special": True}),
                        "token ids up to 1024")):
        folder = tmp_path / "tok"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(fx("llama-hf-bpe"), folder)
        tok = json.loads((folder / "tokenizer.json").read_text())
        edit(tok)
        (folder / "tokenizer.json").write_text(json.dumps(tok))
        assert said in refused(cli, "convert", folder, out)
    assert not out.exists()


def test_a_llama_with_its_own_head_size_writes_the_key_length_llama_cpp_reads(cli, tmp_path):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, vocab_size=1024, max_position_embeddings=128)
    folder = tmp_path / "hd32"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((TRAINED_GPT2 / name).read_bytes())
    run_json(cli, "convert", folder, tmp_path / "m.gguf")
    meta = run_json(cli, "inspect", tmp_path / "m.gguf")["gguf_metadata"]
    assert meta["llama.rope.dimension_count"] == 32 and meta["llama.attention.key_length"] == 32
    assert meta["llama.attention.value_length"] == 32


def test_the_vocabulary_is_checked_and_a_gguf_source_is_not_requantized(cli, fx, tmp_path):
    import shutil

    src = fx("gpt2-hf-bpe")
    gg = tmp_path / "m.gguf"
    report = run_json(cli, "convert", src, gg)
    tok = next(c for c in report["verification"]["checks"] if c["name"] == "tokenizer")
    assert tok["passed"] and tok["tokens"] > 50
    other = tmp_path / "other"  # the same model with two token ids swapped in its tokenizer
    shutil.copytree(src, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġa"] = vocab["Ġa"], vocab["Ġthe"]
    (other / "tokenizer.json").write_text(json.dumps(data))
    failed = run_json(cli, "verify", other, gg, code=1)
    assert [c["name"] for c in failed["checks"] if not c["passed"]] == ["tokenizer"]
    assert "quantize its model folder" in refused(cli, "quantize", gg, tmp_path / "q", "--target", "cpu",
                                                  "--method", "int8-dynamic")
    q8 = tmp_path / "q8.gguf"
    run_json(cli, "quantize", src, q8, "--target", "cpu", "--no-verify")
    back = run_json(cli, "verify", q8, src)  # the quantized GGUF as the reference: judged by its int8 profile
    assert back["ok"] and back["profile"] == "int8"


def test_weights_mode_says_what_the_file_stores():
    from llmconv.verification.weights import _compare_cast

    w = torch.tensor([1.0, 0.1, 3.0e4])
    ok = _compare_cast("w", w, w.to(torch.float16))
    assert ok.passed and ok.figures["equal"] is False and ok.figures["stored_as"] == "float16"
    big = torch.tensor([1.0, 1.0e6])
    bad = _compare_cast("w", big, big.to(torch.float16))  # inf where the model has 1e6
    assert not bad.passed and bad.figures["overflow"] == 1
    wrong = _compare_cast("w", w, (w * 1.001).to(torch.float16))
    assert not wrong.passed and "cast to float16" in wrong.reason
