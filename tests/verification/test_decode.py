"""The cached decode loop and greedy generation: what ``generate()`` runs, checked the way it runs.

Seeded faults that a single forward pass with an empty cache cannot see (a graph that zeroes its past, a
graph that ignores the attention mask) must fail; legitimate exports must pass; the loop must give the tokens
transformers' own ``generate()`` and optimum's ``ORTModelForCausalLM.generate()`` give.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fixtures import faults
from llmconv.verification.decode import DecodePlan, make_plan, run_loop
from llmconv.verification.outputs import compare_outputs
from llmconv.verification.runners import describe, open_runner
from tests.export import _exports

FORWARD = ("logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value")

DECODE_CHECKS = ["decode.prefill", "decode.steps", "decode.consistency",
                 "decode.cache", "generation"]


@pytest.fixture(scope="module")
def llama(fixtures_dir, fx):
    return fx("llama-hf"), _exports.export(fixtures_dir, fx, "llama-hf")[0]


@pytest.fixture(scope="module")
def gpt2(fixtures_dir, fx):
    return fx("gpt2-hf"), _exports.export(fixtures_dir, fx, "gpt2-hf")[0]


def _checks(report):
    return {c.name: c for c in report.checks}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_graph_that_zeroes_its_past_fails_only_through_the_cache(request, arch, tmp_path):
    hf, onnx_dir = request.getfixturevalue(arch)
    broken = faults.past_zeroed(onnx_dir, tmp_path / "broken")
    # What one forward pass with an empty cache sees: nothing wrong.
    before = compare_outputs(hf, broken, decode_steps=0, generate=0)
    assert before.passed and [c.name for c in before.checks] == list(FORWARD)
    report = compare_outputs(hf, broken)
    checks = _checks(report)
    assert not report.passed
    assert all(checks[n].passed for n in (*FORWARD, "decode.prefill"))
    steps = checks["decode.steps"]
    assert not steps.passed and steps.figures["first_failing_step"] == 1
    assert "first at decode step 1 of 4" in steps.reason
    assert steps.figures["steps"][0]["max_abs"] > 1e-3
    if arch == "llama":  # the random tiny GPT-2 repeats its favourite token with or without a past
        assert not checks["generation"].passed and checks["generation"].figures["agreement"] < 1.0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_graph_that_ignores_the_attention_mask_fails_on_the_left_padded_rows(request, arch, tmp_path):
    hf, onnx_dir = request.getfixturevalue(arch)
    broken = faults.mask_ignored(onnx_dir, tmp_path / "broken")
    report = compare_outputs(hf, broken)
    checks = _checks(report)
    assert not report.passed and not checks["decode.prefill"].passed
    # decode.prefill compares the real positions only: the padded rows' own tokens see the padding.
    assert "beyond atol 0.0001" in checks["decode.prefill"].reason
    assert not checks["generation"].passed or not checks["decode.steps"].passed
    assert report.extra["decode"]["left_padded"] == 3


def test_cache_check_names_the_layer_whose_cache_differs(llama, tmp_path):
    hf, onnx_dir = llama
    broken, node = faults.layer_scaled(onnx_dir, tmp_path / "broken", 0)
    report = compare_outputs(onnx_dir, broken)
    cache = _checks(report)["decode.cache"]
    assert not cache.passed and cache.figures["first_failing"] == "present.1.key", cache.figures
    assert cache.figures["layers"] == 2 and cache.figures["positions"] == 8 + 5  # the longest prompt, then 5 calls


def test_loop_gives_the_tokens_of_transformers_generate_and_optimum_ort_generate(llama):
    import torch
    import transformers

    hf, onnx_dir = llama
    plan = make_plan(vocab_size=1024, max_positions=128, pad_id=0, decode_steps=8, generate=12, seq_len=10, seed=3)
    ids, mask = torch.from_numpy(plan.ids), torch.from_numpy(plan.mask)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=False).eval()
    model.generation_config.eos_token_id = None  # our loop runs the full N tokens; generate() must too
    with torch.inference_mode():
        want = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                              pad_token_id=0)[:, ids.shape[1]:].numpy()
    hf_trace = _trace(hf, plan)
    onnx_trace = _trace(onnx_dir, plan)
    assert (hf_trace.tokens[:, :12] == want).all()
    assert (onnx_trace.tokens[:, :12] == want).all()

    from optimum.onnxruntime import ORTModelForCausalLM

    ort_model = ORTModelForCausalLM.from_pretrained(onnx_dir, use_cache=True, trust_remote_code=False)
    ort_model.generation_config.eos_token_id = None
    got = ort_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                             pad_token_id=0)[:, ids.shape[1]:].numpy()
    assert (got == want).all()


def _trace(path, plan: DecodePlan):
    sig = describe(path)
    runner = open_runner(sig, task="text-generation-with-past", provider="cpu")
    try:
        return run_loop(runner, sig, plan, calls=plan.calls)
    finally:
        runner.close()


def test_generation_figures_count_where_each_prompt_parts(llama, tmp_path):
    hf, onnx_dir = llama
    broken = faults.past_zeroed(onnx_dir, tmp_path / "broken")
    report = compare_outputs(onnx_dir, broken, profile="int4", generate=10)
    gen = _checks(report)["generation"]
    rows = gen.figures["per_prompt"]
    assert gen.figures["prompts"] == len(rows) == 4 and gen.figures["new_tokens"] == 10
    for row in rows:
        first = row["first_divergence"]
        if first is None:
            assert row["agreement"] == 1.0 and "reference_tokens" not in row
            continue
        ref, cand = row["reference_tokens"], row["candidate_tokens"]
        assert ref[:first] == cand[:first] and ref[first] != cand[first]
        assert row["agreement"] == first / 10
        assert row["token_agreement"] == sum(a == b for a, b in zip(ref, cand, strict=True)) / 10
    # The first token comes from the prefill, which an empty past leaves intact: no prompt parts at token 0.
    assert all(r["first_divergence"] != 0 for r in rows)
    assert gen.figures["agreement"] == pytest.approx(np.mean([r["agreement"] for r in rows]))


def test_prompts_file_and_text_prompts(gpt2, tmp_path):
    hf, onnx_dir = gpt2
    prompts = tmp_path / "prompts.txt"
    # The fixture tokenizer knows the words w0..w1019.
    prompts.write_text("w1 w2 w3 w4 w5\n\nw7 w8\nw9\n", encoding="utf-8")
    report = compare_outputs(hf, onnx_dir, prompts=prompts, generate=6, decode_steps=3)
    meta = report.extra["decode"]
    assert meta["prompts"] == 3 and meta["prompt_lengths"] == [5, 2, 1] and meta["left_padded"] == 2
    assert meta["source"] == f"--prompts {prompts}" and report.passed
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 1000}" for i in range(300)), encoding="utf-8")
    report = compare_outputs(hf, onnx_dir, text=text)
    checks = _checks(report)
    assert report.extra["decode"]["source"] == "--text" and report.extra["decode"]["prompts"] == 4
    assert checks["text.logits"].passed and checks["text.logits"].figures["top1_agreement"] == 1.0
    assert checks["text.logits"].figures["shape"][0] == 297  # 300 tokens in windows of 128, 127 + 127 + 43 predicted


def test_text_figures_are_the_ones_the_verdict_uses(tmp_path):
    """A graph whose position embeddings beyond 32 are scrambled runs right on every random-id input (16 tokens,
    13 with decoding) and wrong on a real text's 256-token windows: the text's top-1 must fail it."""
    from pathlib import Path

    from llmconv.export import to_onnx

    root = Path(__file__).resolve().parents[2]
    hf, heldout = root / "fixtures" / "models" / "trained-gpt2", root / "fixtures" / "data" / "heldout.txt"
    good = tmp_path / "good"
    to_onnx(hf, good, src_format="hf", dtype="keep", verify=False, force=False)

    def scramble(arrays):
        wpe = arrays["transformer.wpe.weight"]
        wpe[32:] = wpe[32:][np.random.default_rng(0).permutation(len(wpe) - 32)]

    bad = _exports.edit_initializers(good, tmp_path / "bad", scramble)
    assert compare_outputs(hf, bad, profile="int8").passed  # random ids never reach position 32
    report = compare_outputs(hf, bad, profile="int8", text=heldout)
    checks = _checks(report)
    assert not report.passed and not checks["text.logits"].passed
    assert "top-1 agreement" in checks["text.logits"].reason and checks["text.logits"].figures["top1_agreement"] < 0.9
    assert checks["logits"].passed and checks["decode.steps"].passed
    ok = compare_outputs(hf, good, profile="fp32", text=heldout)
    assert ok.passed and _checks(ok)["text.logits"].figures["top1_agreement"] == 1.0


def test_off_with_zero_and_refused_for_models_that_do_not_generate(gpt2, fixtures_dir, fx, tmp_path):
    hf, onnx_dir = gpt2
    report = compare_outputs(hf, onnx_dir, decode_steps=0, generate=0)
    assert [c.name for c in report.checks] == list(FORWARD)
    assert any("not checked (--decode-steps 0 --generate 0)" in n for n in report.notes)
    only_gen = compare_outputs(hf, onnx_dir, decode_steps=0, generate=4)
    assert [c.name for c in only_gen.checks][len(FORWARD):] == ["decode.prefill", "generation"]
    bert_onnx = _exports.export(fixtures_dir, fx, "bert-hf")[0]
    report = compare_outputs(fx("bert-hf"), bert_onnx)
    assert "decode" not in report.extra and [c.name for c in report.checks] == ["last_hidden_state"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1\n", encoding="utf-8")
    from llmconv.errors import UsageError

    with pytest.raises(UsageError, match="needs two causal language models"):
        compare_outputs(fx("bert-hf"), bert_onnx, prompts=prompts)


def test_cli_flags_json_and_localize_hint(llama, cli, tmp_path):
    hf, onnx_dir = llama
    broken = faults.past_zeroed(onnx_dir, tmp_path / "broken")
    junit = tmp_path / "r.xml"
    r = cli("verify", hf, broken, "--json", "--decode-steps", "4", "--generate", "6", "--junit", junit)
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)
    names = [c["name"] for c in out["checks"]]
    assert names[-6:] == [*DECODE_CHECKS, "weights"]  # the weights check: the graph's name record (unbroken weights)
    assert out["decode"]["decode_steps"] == 4 and out["decode"]["generate"] == 6
    assert len(out["checks"][-5]["steps"]) == 4 and out["checks"][-1]["passed"] is True
    assert any("--localize" in n for n in out["notes"])
    xml = junit.read_text()
    assert 'name="generation"' in xml and "parts at token" in xml
    r = cli("verify", hf, broken)
    assert r.exit_code == 1
    assert "generation: 4 prompts x 6 tokens" in r.stdout and "parted: prompt" in r.stdout
    r = cli("verify", hf, broken, "--decode-steps", "0", "--generate", "0")
    assert r.exit_code == 0, r.output


def test_convert_gate_runs_the_decode_loop(fx, cli, tmp_path):
    r = cli("convert", fx("qwen2-hf"), tmp_path / "q", "--to", "onnx", "--json", "--generate", "5")
    assert r.exit_code == 0, r.output
    checks = json.loads(r.stdout)["verification"]["checks"]
    assert [c["name"] for c in checks][-5:] == DECODE_CHECKS
    assert checks[-1]["new_tokens"] == 5 and checks[-1]["identical"] == 4
    r = cli("convert", fx("qwen2-hf"), tmp_path / "w.safetensors", "--generate", "5")
    assert r.exit_code == 2 and "apply to an ONNX export's verification" in r.output


def test_localize_names_the_perturbed_matmul_of_a_quantized_graph(llama, cli, tmp_path):
    _, onnx_dir = llama
    from llmconv.transforms.quantize import quantize

    int8 = tmp_path / "int8"
    quantize(onnx_dir, int8, target="cpu", method="int8-dynamic", verify=False)
    assert compare_outputs(onnx_dir, int8, decode_steps=0, generate=0).passed
    broken, node = faults.matmul_perturbed(int8, tmp_path / "broken", "layers.0/mlp/down_proj")
    r = cli("verify", onnx_dir, broken, "--localize", "--json")
    assert r.exit_code == 1, r.output
    loc = json.loads(r.stdout)["localization"]
    first = loc["first"]
    assert loc["method"] == "shared tensors" and first is not None
    # The shared tensor is the float MatMul's output, which the quantized graph keeps by name.
    assert "layers.0/mlp/down_proj" in first["tensor"], first
    assert "layers.0/mlp/down_proj" in loc["summary"]
    junit = tmp_path / "loc.xml"
    r = cli("verify", onnx_dir, broken, "--localize", "--junit", junit)
    assert "where they part" in r.stdout and "down_proj" in r.stdout
    assert 'name="localization"' in junit.read_text() and "down_proj" in junit.read_text()


def test_localize_names_the_layer_of_an_hf_to_onnx_fault(llama, cli, tmp_path):
    hf, onnx_dir = llama
    broken, node = faults.layer_scaled(onnx_dir, tmp_path / "broken", 0)
    r = cli("verify", hf, broken, "--localize", "--json")
    assert r.exit_code == 1, r.output
    loc = json.loads(r.stdout)["localization"]
    assert loc["method"] == "decoder layers" and loc["first"]["layer"] == 0, loc


def test_a_graph_that_counts_its_own_positions_is_not_a_false_alarm(fx, tmp_path):
    """optimum's Gemma graph takes no position_ids: on a left-padded row it counts the padding, so its rotary keys
    are turned by a constant angle per row. Attention does not see it (the logits agree); the cache check must
    not fail on it either, and still runs on the unpadded prompt."""
    import shutil

    import torch
    import transformers as tf

    from llmconv.export import to_onnx

    torch.manual_seed(0)
    config = tf.GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=16, max_position_embeddings=128, vocab_size=1024)
    hf = tmp_path / "gemma"
    tf.AutoModelForCausalLM.from_config(config).eval().save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(fx("llama-hf") / name, hf / name)
    report = to_onnx(hf, tmp_path / "onnx", src_format="hf", dtype="keep", verify=True, force=False).verification
    assert "position_ids" not in describe(tmp_path / "onnx").inputs
    cache = _checks(report)["decode.cache"]
    assert report.passed and cache.figures["max_abs"] < 1e-5 and cache.figures["shape"][0] == 8 + 5
    assert any("compares only the prompts without padding (1 of 4)" in n for n in report.notes)


def test_a_failed_gate_says_how_to_localize_what_it_did_not_keep(llama, tmp_path):
    from llmconv.errors import NotEquivalent
    from llmconv.transforms.quantize import quantize

    _, onnx_dir = llama
    with pytest.raises(NotEquivalent) as e:
        quantize(onnx_dir, tmp_path / "q", target="cpu", method="int8-dynamic", atol=1e-9)
    assert not (tmp_path / "q").exists()
    # The command's own paths, not placeholders.
    assert any(f"write the output with --no-verify, then run llmconv verify {onnx_dir} {tmp_path / 'q'} --localize"
               in n for n in e.value.report.notes), e.value.report.notes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The bundled trained GPT-2, its fp32 export and an int4 copy (unverified: the tests judge them)."""
    from pathlib import Path

    from llmconv.export import to_onnx
    from llmconv.transforms.quantize import quantize

    root = Path(__file__).resolve().parents[2]
    hf = root / "fixtures" / "models" / "trained-gpt2"
    work = tmp_path_factory.mktemp("trained")
    to_onnx(hf, work / "fp32", src_format="hf", dtype="keep", verify=False, force=False)
    quantize(work / "fp32", work / "int4", target="cpu", method="int4", verify=False)
    return hf, work / "fp32", work / "int4"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_positions_late_after_the_cache_fail_at_int4_and_a_real_int4_passes(trained, tmp_path, seed):
    """Position ids one late once the cache is not empty change the logits less than 4-bit weights do: against the
    reference the shift hides in the int4 budget (the audit found it passing at every seed). The candidate against
    itself without a cache (decode.consistency) does not depend on the quantization, and catches it."""
    _, fp32, int4 = trained
    shifted = faults.positions_shifted(int4, tmp_path / "shifted")
    bad = compare_outputs(fp32, shifted, seed=seed)
    consistency = _checks(bad)["decode.consistency"]
    assert not bad.passed and not consistency.passed, consistency.figures
    assert "handled wrongly once the cache is not empty" in consistency.reason
    good = compare_outputs(fp32, int4, seed=seed)
    # int4 with accuracy_level 4 quantizes activations per block, row by row: KL < 1e-8 with VNNI, 6e-6 on AVX2.
    assert _checks(good)["decode.consistency"].passed and _checks(good)["decode.consistency"].figures["kl"] < 2e-4


def test_text_logits_stay_judged_when_the_reference_logits_are_capped(trained, monkeypatch):
    from pathlib import Path

    import llmconv.verification.outputs as outputs

    hf, fp32, _ = trained
    heldout = Path(__file__).resolve().parents[2] / "fixtures" / "data" / "heldout.txt"
    monkeypatch.setattr(outputs, "TEXT_LOGITS_BYTES", 1024 * 4 * 100)  # 100 positions of the 1024-token vocabulary
    report = compare_outputs(hf, fp32, text=heldout, decode_steps=0, generate=0)
    text = _checks(report)["text.logits"]
    assert text.passed and text.figures["shape"] == [100, 1024]
    assert any("text.logits compared the first 100 of the text's" in n for n in report.notes)
    monkeypatch.setattr(outputs, "TEXT_LOGITS_BYTES", 16)  # less than one position: one is kept all the same
    assert _checks(compare_outputs(hf, fp32, text=heldout, decode_steps=0, generate=0))["text.logits"].figures[
        "shape"] == [1, 1024]


def test_prompts_of_one_length_still_decode_a_left_padded_row(gpt2, tmp_path):
    hf, onnx_dir = gpt2
    prompts = tmp_path / "one.txt"
    prompts.write_text("w1 w2 w3 w4\n", encoding="utf-8")
    meta = compare_outputs(hf, onnx_dir, prompts=prompts).extra["decode"]
    assert meta["prompt_lengths"] == [4, 2] and meta["left_padded"] == 1
    assert "second half of the first prompt" in meta["source"]
    meta = compare_outputs(hf, onnx_dir, seq_len=1).extra["decode"]
    assert meta["prompt_lengths"] == [1, 1, 1, 1, 2] and meta["left_padded"] == 4
