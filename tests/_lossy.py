"""Verdicts on lossy outputs (int8, int4) checked by an independent computation, so tests hold on any CPU.

onnxruntime's int8 kernels differ between CPUs: on AVX2 without VNNI its U8S8 kernels saturate (VPMADDUBSW),
so a quantized model's figures, and near a threshold its verdict, are the machine's. A test therefore does not
assert a figure or a verdict measured on one machine. It asserts the product's behaviour:

- either the output was written and is within the profile, and our own onnxruntime sessions on the same inputs,
  with the metrics computed here in numpy, give the same figures and the same verdict;
- or the command refused it (NotEquivalent) and wrote nothing, and the same output built without verification
  and measured here is indeed outside the profile.

Only the thresholds (the profile table) and the inputs (recorded as the verifier made them) come from llmconv.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

LOGITS = ("logits", "start_logits", "end_logits")
# Our sessions and the verifier's may split work differently between threads: float sums can differ in the
# last bits, so a near-tie can flip one arg-max. Figures agree within these, verdicts unless a figure lies
# within them of its threshold.
COSINE_TOL = 1e-5
KL_TOL = 1e-4
PPL_TOL = 1e-3  # relative change of perplexity, absolute
# Keyword arguments of llmconv.quantize that only say how the output is verified.
_VERIFY_ONLY = ("text", "inputs", "atol", "rtol", "max_ppl_increase", "provider", "verify")


@contextlib.contextmanager
def recorded_feeds() -> Iterator[list[list[dict[str, Any]]]]:
    """Record the feeds the verifier runs (each call of its input makers appends its list of feeds)."""
    from llmconv.verification import inputs as mod

    calls: list[list[dict[str, Any]]] = []
    synthetic, load = mod.synthetic_inputs, mod.load_inputs

    def synthetic_spy(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        feeds = synthetic(*args, **kwargs)
        calls.append([{k: np.array(v, copy=True) for k, v in f.items()} for f in feeds])
        return feeds

    def load_spy(*args: Any, **kwargs: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        feeds, meta = load(*args, **kwargs)
        calls.append([{k: np.array(v, copy=True) for k, v in f.items()} for f in feeds])
        return feeds, meta

    with mock.patch.object(mod, "synthetic_inputs", synthetic_spy), mock.patch.object(mod, "load_inputs", load_spy):
        yield calls


def _session(model: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def _run(sess: Any, feed: dict[str, Any]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    taken = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feed.items() if k in taken}), strict=True))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def measure(reference: Path, candidate: Path, feeds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Figures of every output both graphs give, over every feed: mean cosine along the last axis, and for
    logits top-1 / top-5 agreement and mean KL(reference || candidate) (nats). Float64 numpy."""
    ref_sess, cand_sess = _session(reference), _session(candidate)
    acc: dict[str, dict[str, float]] = {}
    for feed in feeds:
        ref, cand = _run(ref_sess, feed), _run(cand_sess, feed)
        for name in (n for n in ref if n in cand):
            r = ref[name].astype(np.float64).reshape(-1, ref[name].shape[-1])
            c = cand[name].astype(np.float64).reshape(-1, cand[name].shape[-1])
            assert np.isfinite(c).all(), f"{candidate}: non-finite values in {name}"
            a = acc.setdefault(name, {"rows": 0, "cos": 0.0, "top1": 0, "top5": 0, "kl": 0.0})
            nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
            cos = np.where((nr > 0) & (nc > 0), (r * c).sum(axis=1) / np.maximum(nr * nc, 1e-300),
                           np.where((nr == 0) & (nc == 0), 1.0, 0.0))
            a["rows"] += r.shape[0]
            a["cos"] += float(np.clip(cos, -1, 1).sum())
            if name in LOGITS:
                best = r.argmax(axis=1)
                a["top1"] += int((c.argmax(axis=1) == best).sum())
                # top-5: fewer than 5 candidate scores above the reference's best token's score
                a["top5"] += int(((c > c[np.arange(len(best)), best][:, None]).sum(axis=1) < 5).sum())
                lr, lc = _log_softmax(r), _log_softmax(c)
                a["kl"] += float(np.maximum((np.exp(lr) * (lr - lc)).sum(axis=1), 0).sum())
    out = {}
    for name, a in acc.items():
        n = a["rows"]
        figs = {"cosine": a["cos"] / n, "rows": n}
        if name in LOGITS:
            figs |= {"top1_agreement": a["top1"] / n, "top5_agreement": a["top5"] / n, "kl": a["kl"] / n}
        out[name] = figs
    return out


def perplexity(model: Path, tokenizer_dir: Path, text: Path) -> tuple[float, int]:
    """Perplexity of a causal graph on ``text`` (its own ``tokenizers`` encoding, non-overlapping windows of the
    model's context, empty past): (perplexity, tokens predicted)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(text.read_text(encoding="utf-8")).ids
    config = json.loads((tokenizer_dir / "config.json").read_text())
    window = config.get("n_positions") or config.get("max_position_embeddings") or 1024
    sess = _session(model)
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = np.asarray(ids[start:start + window], dtype=np.int64)[None, :]
        n = chunk.shape[1]
        if n < 2:
            continue
        feed = {"input_ids": chunk, "attention_mask": np.ones_like(chunk),
                "position_ids": np.arange(n, dtype=np.int64)[None, :]}
        feed |= {i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32) for i in past}
        lp = _log_softmax(_run(sess, feed)["logits"][0].astype(np.float64))
        nll -= float(lp[np.arange(n - 1), chunk[0, 1:]].sum())
        count += n - 1
    return math.exp(nll / count), count


def _margins(figs: dict[str, float]) -> dict[str, float]:
    top = 1.0 / figs["rows"] + 1e-9  # one position's arg-max
    return {"cosine": COSINE_TOL, "top1_agreement": top, "top5_agreement": top, "kl": KL_TOL}


def _within(key: str, value: float, limit: float) -> bool:
    return value <= limit if key in ("kl", "relative_change") else value >= limit


_LIMITS = {"cosine": "min_cosine", "top1_agreement": "min_top1", "top5_agreement": "min_top5", "kl": "max_kl"}


def assert_verdict_is_independent(report: Any, reference: Path, candidate: Path, feeds: list[dict[str, Any]], *,
                                  text: Path | None = None) -> dict[str, dict[str, float]]:
    """The verifier's figures and verdict on ``candidate`` are the ones measured here on the same feeds.

    Returns:
        The independent figures (output name -> figures; ``perplexity`` -> its relative change with ``text``).
    """
    limits = dict(report.extra["thresholds"])
    elementwise = "atol" in limits or "rtol" in limits  # not measured here: compare figures only
    ours = measure(reference, candidate, feeds)
    for check in report.checks:
        if check.name == "perplexity" or check.name not in ours:
            continue
        figs, margin = ours[check.name], _margins(ours[check.name])
        ok, settled = True, not elementwise
        for key, limit_name in _LIMITS.items():
            if key not in figs or check.figures.get(key) is None:
                continue
            assert abs(check.figures[key] - figs[key]) <= margin[key], (check.name, key, check.figures[key], figs[key])
            if limit_name in limits:
                limit = limits[limit_name]
                settled = settled and abs(figs[key] - limit) > margin[key]  # else two runs may honestly disagree
                ok = ok and _within(key, figs[key], limit)
        if settled:
            assert check.passed == ok, (check.name, check.passed, figs, limits)
    if "decode" in report.extra:
        ours |= assert_decode_is_independent(report, reference, candidate)
    ppl = next((c for c in report.checks if c.name == "perplexity"), None)
    if ppl is not None:
        assert text is not None
        folder = reference.parent
        r_ppl, tokens = perplexity(reference, folder, text)
        c_ppl, _ = perplexity(candidate, folder, text)
        change = (c_ppl - r_ppl) / r_ppl
        ours["perplexity"] = {"relative_change": change, "tokens": tokens}
        assert ppl.figures["tokens"] == tokens
        assert abs(ppl.figures["relative_change"] - change) <= PPL_TOL, (ppl.figures, change)
        budget = ppl.figures["budget"]
        if abs(change - budget) > PPL_TOL:
            assert ppl.passed == (change <= budget), (ppl.figures, change)
    return ours


def greedy_loop(model: Path, prompts: list[list[int]], *, pad: int, calls: int,
                forced: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Our own greedy loop over an ONNX graph with past key/values, as transformers' generate() feeds one: the
    prompts left-padded, position ids ``cumsum(mask) - 1`` (1 on the padding), then one token per call with the
    graph's ``present.*`` fed back as ``past_key_values.*``; ``forced`` feeds given tokens instead of the
    graph's own. Returns (its arg-max at each step [prompts, calls + 1], the logits of each step)."""
    sess = _session(model)
    width = max(len(p) for p in prompts)
    ids = np.array([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    past_inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    past = {i.name: np.zeros([len(prompts), i.shape[1], 0, i.shape[3]], np.float32) for i in past_inputs}
    pos = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
    chosen, logits = [], []
    for step in range(calls + 1):
        out = _run(sess, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})
        last = out["logits"][:, -1, :].astype(np.float64)
        logits.append(last)
        chosen.append(last.argmax(axis=1))
        past = {i.name: out[i.name.replace("past_key_values.", "present.")] for i in past_inputs}
        ids = (forced[:, step] if forced is not None else chosen[-1])[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        pos = mask.sum(axis=1, keepdims=True) - 1
    return np.stack(chosen, axis=1), logits


def assert_decode_is_independent(report: Any, reference: Path, candidate: Path) -> dict[str, dict[str, float]]:
    """The decode-step and generation figures (and verdicts, away from their thresholds) are the ones our own
    greedy loops give on the prompts the report names."""
    meta = report.extra["decode"]
    prompts, k, n = meta["prompt_ids"], meta["decode_steps"], meta["generate"]
    config = json.loads((reference.parent / "config.json").read_text())
    pad = config.get("pad_token_id") if isinstance(config.get("pad_token_id"), int) else 0
    calls = max(k, n - 1)
    ref_tokens, ref_logits = greedy_loop(reference, prompts, pad=pad, calls=calls)
    cand_tokens, cand_logits = greedy_loop(candidate, prompts, pad=pad, calls=calls, forced=ref_tokens)
    checks = {c.name: c for c in report.checks}
    ours: dict[str, dict[str, float]] = {}
    if k and "decode.steps" in checks:
        hits = sum(int((r.argmax(axis=1) == c.argmax(axis=1)).sum()) for r, c in zip(ref_logits[1:k + 1],
                                                                                    cand_logits[1:k + 1], strict=True))
        rows = k * len(prompts)
        ours["decode.steps"] = {"top1_agreement": hits / rows, "rows": rows}
        assert abs(checks["decode.steps"].figures["top1_agreement"] - hits / rows) <= 1 / rows + 1e-9
    if n and "generation" in checks:
        figs = checks["generation"].figures
        firsts = []
        for m in range(len(prompts)):
            parts = np.flatnonzero(ref_tokens[m, :n] != cand_tokens[m, :n])
            firsts.append(int(parts[0]) if parts.size else None)
            reported = figs["per_prompt"][m]["first_divergence"]
            if reported != firsts[-1]:
                # Only a near-tie (another thread split flips one arg-max) may make two honest runs differ.
                step = min(s for s in (reported, firsts[-1]) if s is not None)
                top2 = np.sort(cand_logits[step][m])[-2:]
                assert top2[1] - top2[0] < 1e-4, (m, reported, firsts[-1])
        agreement = float(np.mean([1.0 if f is None else f / n for f in firsts]))
        ours["generation"] = {"agreement": agreement}
        limit = figs["min_agreement"]
        if figs["ties"] == 0 and abs(agreement - figs["agreement"]) < 1e-9 and limit is not None:
            assert checks["generation"].passed == (agreement >= limit), (figs, agreement)
    return ours


def model_file(path: Path) -> Path:
    return path / "model.onnx" if path.is_dir() else path


def quantize_checked(src: Path | str, dst: Path | str, *, may_refuse: bool, **kwargs: Any) -> tuple[Any, Any]:
    """``llmconv.quantize(src, dst, **kwargs)`` for an ONNX source, its verdict checked here, on any CPU.

    Either the output was written: it passed, and the figures and verdict agree with our own measurement of
    the written file on the verifier's inputs. Or, only with ``may_refuse`` (an int8 quality floor, which is
    the CPU's kernels' doing), it was refused: NotEquivalent, nothing written, and the same output built
    without verification (beside ``dst``, removed after) measures outside the profile here too. A refusal
    is rebuilt with the same settings, so ``may_refuse`` needs an explicit ``method`` (no fallback).

    Returns:
        (the quantize report: of the written output, or of the unverified build when refused; the verification
        report: passed when written, the refusal's when refused)
    """
    import shutil

    import llmconv
    from llmconv.errors import NotEquivalent

    assert not may_refuse or kwargs.get("method") not in (None, "auto"), "a refusal is rebuilt: give the method"
    src, dst = Path(src), Path(dst)
    reference = model_file(src)
    text = kwargs.get("text")
    with recorded_feeds() as calls:
        try:
            report = llmconv.quantize(src, dst, **kwargs)
        except NotEquivalent as e:
            if not may_refuse:
                raise
            refused = e
        else:
            v = report.verification
            assert v is not None and v.passed, v.summary()
            assert_verdict_is_independent(v, reference, model_file(dst), _feeds(v, calls), text=text)
            return report, v
    assert not dst.exists() and "nothing was written" in str(refused)
    assert not any(".llmconv-" in p.name for p in dst.parent.rglob("*"))
    v = refused.report
    assert v is not None and not v.passed
    probe = dst.parent / f"unverified-{dst.name}"
    report = llmconv.quantize(src, probe, **{k: a for k, a in kwargs.items() if k not in _VERIFY_ONLY}, verify=False)
    try:
        assert_verdict_is_independent(v, reference, model_file(probe), _feeds(v, calls), text=text)
    finally:
        for p in probe.parent.glob(probe.name + "*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return report, v


def _feeds(report: Any, calls: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The feeds of the last verification (the one of the output reported), checked against its report."""
    feeds = calls[-1]
    meta = report.inputs or {}
    assert len(feeds) == meta.get("samples"), meta
    assert "input_ids" not in feeds[0] or feeds[0]["input_ids"].shape[0] == meta.get("batch"), meta
    return feeds
