"""The parts of outputs mode on their own: seeded inputs, the figures, the profiles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmconv.errors import UsageError
from llmconv.verification.inputs import (
    InputPlan,
    PastSpec,
    feed_shapes,
    load_inputs,
    second_length,
    synthetic_inputs,
)
from llmconv.verification.metrics import OutputComparison, perplexity_check, token_nll
from llmconv.verification.profiles import OUTPUT_PROFILES, auto_profile, outputs_profile, weights_tolerance

PLAN = InputPlan(wants={"input_ids", "attention_mask", "position_ids", "token_type_ids"}, vocab_size=50,
                 max_positions=64, past=PastSpec(names=[("past_key_values.0.key", "past_key_values.0.value")],
                                                 num_heads=2, head_dim=8))


def test_synthetic_inputs_are_seeded_and_well_formed():
    a = synthetic_inputs(PLAN, batch=3, seq_len=10, samples=3, seed=1)
    b = synthetic_inputs(PLAN, batch=3, seq_len=10, samples=3, seed=1)
    c = synthetic_inputs(PLAN, batch=3, seq_len=10, samples=3, seed=2)
    for x, y in zip(a, b, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])
    # two lengths, then one row of one token: the shape of every decode step
    assert [f["input_ids"].shape for f in a] == [(3, 10), (3, 5), (3, 10), (1, 1)]
    assert feed_shapes(a) == [[3, 10], [3, 5], [1, 1]]
    for f in a[:-1]:
        ids, mask = f["input_ids"], f["attention_mask"]
        assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 50
        length = ids.shape[1]
        assert mask[:-1].all()  # every row but the last is whole
        valid = int(mask[-1].sum())
        assert 1 <= valid < length and mask[-1, :valid].all()  # the last row is right-padded
        assert (f["position_ids"] == np.arange(length)).all() and not f["token_type_ids"].any()
        assert f["past_key_values.0.key"].shape == (3, 2, 0, 8)
        assert f["past_key_values.0.value"].dtype == np.float32
    last = a[-1]
    assert last["attention_mask"].tolist() == [[1]] and last["position_ids"].tolist() == [[0]]
    assert last["past_key_values.0.key"].shape == (1, 2, 0, 8) and 0 <= last["input_ids"][0, 0] < 50
    assert second_length(1) == 2 and second_length(16) == 8


def test_the_one_token_sample_comes_last_and_leaves_the_others_unchanged():
    with_edge = synthetic_inputs(PLAN, batch=2, seq_len=8, samples=2, seed=3)
    without = synthetic_inputs(PLAN, batch=2, seq_len=8, samples=2, seed=3, edge_shapes=False)
    assert feed_shapes(without) == [[2, 8], [2, 4]] and feed_shapes(with_edge) == [[2, 8], [2, 4], [1, 1]]
    for x, y in zip(with_edge, without, strict=False):
        assert all(np.array_equal(x[k], y[k]) for k in y)
    # batch 1 with one token asked for already: nothing added
    assert feed_shapes(synthetic_inputs(PLAN, batch=1, seq_len=1, samples=1, seed=0)) == [[1, 1]]
    assert len(synthetic_inputs(PLAN, batch=1, seq_len=1, samples=3, seed=0)) == 3


def test_synthetic_inputs_refuse_what_they_cannot_make():
    with pytest.raises(UsageError, match="needs 100 positions but the model has 64"):
        synthetic_inputs(PLAN, batch=1, seq_len=100, samples=1, seed=0)
    with pytest.raises(UsageError, match=r"inputs llmconv cannot make up: input_features \(give them with "
                                         r"--inputs FILE.npz .*export with --no-verify, then run llmconv verify"):
        synthetic_inputs(InputPlan(wants={"input_ids", "input_features"}, vocab_size=5), batch=1, seq_len=4,
                         samples=1, seed=0)
    with pytest.raises(UsageError, match="takes pixel_values and input_ids; llmconv makes up images only"):
        synthetic_inputs(InputPlan(wants={"input_ids", "pixel_values"}, vocab_size=5), batch=1, seq_len=4,
                         samples=1, seed=0)
    with pytest.raises(UsageError, match="vocabulary size"):
        synthetic_inputs(InputPlan(wants={"input_ids"}), batch=1, seq_len=4, samples=1, seed=0)


def test_load_inputs_completes_and_checks(tmp_path):
    ids = np.array([[1, 2, 3]], dtype=np.int32)
    np.savez(tmp_path / "a.npz", input_ids=ids)
    feeds, meta = load_inputs(tmp_path / "a.npz", PLAN)
    f = feeds[0]
    assert f["input_ids"].dtype == np.int64 and f["attention_mask"].tolist() == [[1, 1, 1]]
    assert f["position_ids"].tolist() == [[0, 1, 2]] and f["past_key_values.0.key"].shape == (1, 2, 0, 8)
    assert meta == {"batch": 1, "seq_len": 3, "samples": 2, "seed": None, "file": str(tmp_path / "a.npz"),
                    "shapes": [[1, 3], [1, 1]]}
    edge = feeds[1]  # the first token of the first row, with its own position id and mask
    assert edge["input_ids"].tolist() == [[1]] and edge["position_ids"].tolist() == [[0]]
    assert edge["attention_mask"].tolist() == [[1]] and edge["past_key_values.0.key"].shape == (1, 2, 0, 8)
    np.savez(tmp_path / "obj.npz", input_ids=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UsageError, match="pickles are refused"):
        load_inputs(tmp_path / "obj.npz", PLAN)
    np.savez(tmp_path / "mask.npz", input_ids=ids, attention_mask=np.ones((1, 4)))
    with pytest.raises(UsageError, match=r"attention_mask has shape \[1, 4\], input_ids \[1, 3\]"):
        load_inputs(tmp_path / "mask.npz", PLAN)
    (tmp_path / "not.npz").write_text("hello")
    with pytest.raises(UsageError, match="not.npz: not an .npz file of plain arrays"):
        load_inputs(tmp_path / "not.npz", PLAN)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"input_ids": [[1, 2]], "attention_maks": [[1, 0]]},
     r"arrays the models do not take: attention_maks \(the models take attention_mask, input_ids, position_ids"),
    ({"input_ids": [[1, 2]], "attention_mask": [[0.5, 1.0]]}, "attention_mask must be an integer array, not float"),
    ({"input_ids": [[1, 2]], "attention_mask": [[7, 1]]}, "attention_mask holds values other than 0 and 1"),
    ({"input_ids": [[1, 2]], "attention_mask": [[0, 0]]}, "attention_mask has a row with no token to attend to"),
    ({"input_ids": [[1, 2]], "position_ids": [[500, 501]]}, r"position_ids holds positions outside \[0, 64\)"),
    ({"input_ids": [[1, 2]], "position_ids": [[-1, 0]]}, r"position_ids holds positions outside"),
])
def test_load_inputs_refuses_what_would_be_silently_wrong(tmp_path, arrays, message):
    path = tmp_path / "in.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    with pytest.raises(UsageError, match=message):
        load_inputs(path, PLAN)


def test_load_inputs_refuses_a_single_npy_array(tmp_path):
    np.save(tmp_path / "ids.npy", np.array([[1, 2, 3]]))
    with pytest.raises(UsageError, match=r"ids.npy: this is a single .npy array; --inputs takes an .npz"):
        load_inputs(tmp_path / "ids.npy", PLAN)


def _cmp(profile, ref, cand, logits=True):
    c = OutputComparison("logits", profile=outputs_profile(profile), logits=logits)
    c.add(ref, cand)
    return c.check()


def test_figures_are_right():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 3, 10)).astype(np.float32)
    cand = ref.copy()
    cand[1, 2, 7] += 0.5
    ref[0, 0, 0] = 0.0
    cand[0, 0, 0] = 1e-7  # the reference is 0 here: the relative figure stays finite
    check = _cmp("fp32", ref, cand)
    f = check.figures
    assert not check.passed and f["worst_index"] == [1, 2, 7]
    assert math.isclose(f["max_abs"], 0.5, rel_tol=1e-6)
    assert math.isclose(f["mean_abs"], (0.5 + 1e-7) / ref.size, rel_tol=1e-4)
    assert math.isfinite(f["max_rel"]) and f["max_rel"] >= 0.1
    assert f["top1_agreement"] in (1.0, 5 / 6) and f["top5_agreement"] == 1.0
    assert f["kl"] > 0 and f["cosine"] < 1.0
    assert "1 of 60 elements beyond atol 0.0001 + rtol 0.0001*|ref|" in check.reason


def test_topk_kl_and_cosine():
    ref = np.array([[[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]])
    swapped = ref[..., [0, 1, 2, 3, 4, 6, 5]]  # top-1 changes, top-5 still holds the reference's top-1
    f = _cmp("int8", ref, swapped).figures
    assert f["top1_agreement"] == 0.0 and f["top5_agreement"] == 1.0
    p = np.exp(ref[0, 0]) / np.exp(ref[0, 0]).sum()
    q = np.exp(swapped[0, 0]) / np.exp(swapped[0, 0]).sum()
    assert math.isclose(f["kl"], float((p * np.log(p / q)).sum()), rel_tol=1e-9)
    assert math.isclose(f["cosine"], float(ref.ravel() @ swapped.ravel() / (ref.ravel() @ ref.ravel())),
                        rel_tol=1e-12)
    assert _cmp("int8", ref, swapped).reason == "cosine 0.989011 < 0.99; top-1 agreement 0.0000 < 0.9; KL 0.4 > 0.1"


def test_nan_and_inf():
    ref = np.zeros((2, 4), np.float32)
    cand = ref.copy()
    cand[1, 2] = np.nan
    check = _cmp("fp16", ref, cand, logits=False)
    assert not check.passed and check.figures["nan"] == 1 and check.figures["worst_index"] == [1, 2]
    assert "1 NaN in the candidate's output (first at [1, 2])" in check.reason
    ref2 = np.array([[-np.inf, 1.0]])
    assert _cmp("fp32", ref2, ref2.copy()).passed  # the same infinity on both sides
    cand2 = np.array([[np.inf, 1.0]])
    check = _cmp("fp32", ref2, cand2)
    assert not check.passed and "1 Inf where the reference has a different value" in check.reason
    check = _cmp("fp32", cand, cand.copy(), logits=False)
    assert "the reference itself has 1 NaN" in check.reason


def test_shape_mismatch():
    check = _cmp("fp32", np.zeros((2, 3)), np.zeros((2, 4)))
    assert not check.passed and check.reason == "shape [2, 4] != reference [2, 3]"


def test_perplexity_figures():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    assert math.isclose(token_nll(logits, np.array([0, 2])), -math.log(0.5) - math.log(0.8), rel_tol=1e-12)
    ok = perplexity_check(reference_ppl=10.0, candidate_ppl=10.15, tokens=99, budget=0.02)
    assert ok.passed and math.isclose(ok.figures["relative_change"], 0.015)
    bad = perplexity_check(reference_ppl=10.0, candidate_ppl=10.5, tokens=99, budget=0.02)
    assert not bad.passed and bad.reason == "perplexity rose +5.000% (10 -> 10.5), budget 2.00%"
    nan = perplexity_check(reference_ppl=10.0, candidate_ppl=float("nan"), tokens=9, budget=0.02)
    assert not nan.passed and nan.figures["candidate_ppl"] is None


def test_profiles():
    assert [p for p in OUTPUT_PROFILES] == ["exact", "fp32", "fp16", "bf16", "int8", "int4"]
    assert {p: OUTPUT_PROFILES[p].max_ppl_increase for p in ("fp16", "int8", "int4")} == {
        "fp16": 0.005, "int8": 0.02, "int4": 0.10}
    for name in ("fp16", "int8", "int4"):
        p = OUTPUT_PROFILES[name]
        assert p.min_top1 is not None and p.min_cosine is not None and not p.elementwise
    over = outputs_profile("int8", atol=1e-2, max_ppl_increase=0.05)
    assert over.atol == 1e-2 and over.rtol == 0.0 and over.max_ppl_increase == 0.05 and over.min_top1 == 0.9
    with pytest.raises(UsageError, match="--max-ppl-increase must be >= 0"):
        outputs_profile("int8", max_ppl_increase=-1)
    assert auto_profile(float_dtype="float32", quantization=None) == "fp32"
    assert auto_profile(float_dtype="bfloat16", quantization=None) == "bf16"
    assert auto_profile(float_dtype="float16", quantization="int4") == "int4"
    # Weights mode is unchanged.
    assert weights_tolerance("auto") == ("exact", None, None) and weights_tolerance("fp16") == ("fp16", 1e-3, 1e-3)
