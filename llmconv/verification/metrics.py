"""The figures of outputs mode, computed in float64 with numpy, and the verdict of a profile on them.

Per output (summed over every sample): max and mean absolute difference, max relative difference
(``|c - r| / max(|r|, 1e-6)``, so zeros in the reference give finite figures), mean cosine
similarity along the last axis, NaN and Inf counts of the candidate, the index of the worst element,
and for logits top-1 / top-5 agreement and mean KL(reference || candidate). Logits of rank 2 are one
row of class scores per input (an image or text classifier), of higher rank one row per position;
either way agreement counts rows. Top-5 agreement is measured only over more than five classes: with
five or fewer every class is in the top five, and it would always be 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llmconv.verification.profiles import OutputsProfile
from llmconv.verification.report import Check

REL_FLOOR = 1e-6  # denominator floor of the relative difference


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class OutputComparison:
    """Accumulates one output's figures over samples; :meth:`check` gives the verdict.

    Args:
        name: the output name (``logits``, ``present.0.key``, ...).
        profile: the thresholds to apply.
        logits: whether the last axis holds class scores (adds top-k agreement and KL).
    Example:
        >>> cmp = OutputComparison("logits", profile=outputs_profile("fp32"), logits=True)
        >>> cmp.add(ref, cand); cmp.check().passed
    """

    def __init__(self, name: str, *, profile: OutputsProfile, logits: bool) -> None:
        self.name, self.profile, self.logits = name, profile, logits
        self.shape: list[int] | None = None
        self.dtype: str | None = None
        self.shape_error: str | None = None
        self.n = self.n_finite = 0
        self.sum_abs = 0.0
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.worst_index: list[int] | None = None
        self.worst_key: tuple[int, float] = (-1, -1.0)  # (non-finite mismatch?, diff): larger is worse
        self.nan = self.inf = self.ref_nan = self.inf_mismatch = 0
        self.beyond = 0
        self.cos_sum, self.rows = 0.0, 0
        self.top1 = self.top5 = self.positions = self.top5_positions = 0
        self.kl_sum = 0.0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        """Fold one sample's pair of arrays into the figures."""
        ref, cand = np.asarray(ref), np.asarray(cand)
        if self.shape is None:
            self.shape, self.dtype = list(cand.shape), str(cand.dtype)
        if ref.shape != cand.shape:
            self.shape_error = self.shape_error or f"shape {list(cand.shape)} != reference {list(ref.shape)}"
            return
        r = ref.astype(np.float64, copy=False)
        c = cand.astype(np.float64, copy=False)
        self.n += r.size
        if not r.size:
            return
        if np.isfinite(r).all() and np.isfinite(c).all():  # the usual case: no masks to build
            both = None
            diff = np.abs(c - r)
            flat = int(np.argmax(diff))
            key = (0, float(diff.flat[flat]))
            finite_diff, finite_ref = diff, r
        else:
            r_fin, c_fin = np.isfinite(r), np.isfinite(c)
            both = r_fin & c_fin
            self.nan += int(np.isnan(c).sum())
            self.inf += int(np.isinf(c).sum())
            self.ref_nan += int(np.isnan(r).sum())
            # A non-finite value matches only the same infinity on the other side.
            mismatch = ~both & ~(np.isinf(r) & (r == c))
            self.inf_mismatch += int((mismatch & ~np.isnan(c) & ~np.isnan(r)).sum())
            diff = np.where(both, np.abs(np.where(both, c, 0.0) - np.where(both, r, 0.0)), 0.0)
            if mismatch.any():
                flat = int(np.flatnonzero(mismatch)[0])
                key = (1, math.inf)
            else:
                flat = int(np.argmax(diff))
                key = (0, float(diff.flat[flat]))
            finite_diff, finite_ref = diff[both], r[both]
        if key > self.worst_key:
            self.worst_key = key
            self.worst_index = [int(i) for i in np.unravel_index(flat, r.shape)]
        if finite_diff.size:
            self.n_finite += finite_diff.size
            self.sum_abs += float(finite_diff.sum())
            self.max_abs = max(self.max_abs, float(finite_diff.max()))
            abs_ref = np.abs(finite_ref)
            self.max_rel = max(self.max_rel, float((finite_diff / np.maximum(abs_ref, REL_FLOOR)).max()))
            p = self.profile
            if p.elementwise:
                # Non-finite pairs are reported on their own, not as tolerance failures.
                self.beyond += int((finite_diff > (p.atol or 0.0) + (p.rtol or 0.0) * abs_ref).sum())
        self._vectors(r, c, both)

    def _vectors(self, r: np.ndarray, c: np.ndarray, both: np.ndarray | None) -> None:
        last = r.shape[-1] if r.ndim >= 1 and r.shape[-1] > 0 else 1
        rr, cc = r.reshape(-1, last), c.reshape(-1, last)
        if both is not None:  # only rows that are finite on both sides
            rows_ok = both.reshape(-1, last).all(axis=1)
            rr, cc = rr[rows_ok], cc[rows_ok]
        if not rr.shape[0]:
            return
        nr, nc = np.linalg.norm(rr, axis=1), np.linalg.norm(cc, axis=1)
        dot = (rr * cc).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where((nr > 0) & (nc > 0), dot / (nr * nc), np.where((nr == 0) & (nc == 0), 1.0, 0.0))
        self.cos_sum += float(np.clip(cos, -1.0, 1.0).sum())
        self.rows += rr.shape[0]
        if self.logits and last >= 2:
            ref_top = rr.argmax(axis=1)
            self.top1 += int((ref_top == cc.argmax(axis=1)).sum())
            if last > 5:
                cand_top5 = np.argpartition(-cc, 4, axis=1)[:, :5]
                self.top5 += int((cand_top5 == ref_top[:, None]).any(axis=1).sum())
                self.top5_positions += rr.shape[0]
            self.positions += rr.shape[0]
            lr, lc = _log_softmax(rr), _log_softmax(cc)
            kl = (np.exp(lr) * (lr - lc)).sum(axis=1)
            self.kl_sum += float(np.maximum(kl, 0.0).sum())

    def figures(self) -> dict[str, Any]:
        """The figures in the contract's order."""
        p = self.profile
        has_logits = self.logits and self.positions > 0
        return {
            "shape": self.shape, "dtype": self.dtype,
            "max_abs": self.max_abs, "mean_abs": self.sum_abs / self.n_finite if self.n_finite else 0.0,
            "max_rel": self.max_rel,
            "cosine": self.cos_sum / self.rows if self.rows else None,
            "top1_agreement": self.top1 / self.positions if has_logits else None,
            "top5_agreement": self.top5 / self.top5_positions if has_logits and self.top5_positions else None,
            "kl": self.kl_sum / self.positions if has_logits else None,
            "nan": self.nan, "inf": self.inf,
            "atol": p.atol if p.elementwise else None, "rtol": p.rtol if p.elementwise else None,
            "worst_index": self.worst_index,
        }

    def check(self) -> Check:
        """The verdict: every test the profile applies, with the reasons it failed."""
        figs = self.figures()
        p = self.profile
        if self.shape_error:
            return Check(self.name, False, figs, self.shape_error)
        reasons = []
        if self.ref_nan:
            reasons.append(f"the reference itself has {self.ref_nan} NaN: nothing to compare them with")
        if self.nan:
            reasons.append(f"{self.nan} NaN in the candidate's output (first at {self.worst_index})")
        if self.inf_mismatch:
            reasons.append(f"{self.inf_mismatch} Inf where the reference has a different value")
        if p.elementwise and self.beyond:
            reasons.append(f"{self.beyond} of {self.n} elements beyond atol {p.atol:g} + rtol {p.rtol:g}*|ref| "
                           f"(max abs diff {self.max_abs:.3g} at {self.worst_index})")
        cos = figs["cosine"]
        if p.min_cosine is not None and cos is not None and cos < p.min_cosine:
            reasons.append(f"cosine {cos:.6f} < {p.min_cosine:g}")
        if figs["top1_agreement"] is not None:
            if p.min_top1 is not None and figs["top1_agreement"] < p.min_top1:
                reasons.append(f"top-1 agreement {figs['top1_agreement']:.4f} < {p.min_top1:g}")
            if p.min_top5 is not None and figs["top5_agreement"] is not None and figs["top5_agreement"] < p.min_top5:
                reasons.append(f"top-5 agreement {figs['top5_agreement']:.4f} < {p.min_top5:g}")
            if p.max_kl is not None and figs["kl"] > p.max_kl:
                reasons.append(f"KL {figs['kl']:.3g} > {p.max_kl:g}")
        if self.n == 0:
            reasons.append("no elements compared")
        return Check(self.name, not reasons, figs, "; ".join(reasons))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood (nats) of ``targets`` under ``logits`` ([n, vocab] predicting [n])."""
    lp = _log_softmax(np.asarray(logits, dtype=np.float64))
    return float(-lp[np.arange(len(targets)), targets].sum())


def perplexity_check(*, reference_ppl: float, candidate_ppl: float, tokens: int, budget: float) -> Check:
    """The ``perplexity`` check: the candidate may exceed the reference's perplexity by ``budget`` (a fraction).

    Example:
        >>> perplexity_check(reference_ppl=10.0, candidate_ppl=10.1, tokens=500, budget=0.02).passed
        True
    """
    finite = math.isfinite(reference_ppl) and math.isfinite(candidate_ppl) and reference_ppl > 0
    change = (candidate_ppl - reference_ppl) / reference_ppl if finite else None
    figs = {"reference_ppl": reference_ppl if math.isfinite(reference_ppl) else None,
            "candidate_ppl": candidate_ppl if math.isfinite(candidate_ppl) else None,
            "relative_change": change, "budget": budget, "tokens": tokens}
    if not finite:
        return Check("perplexity", False, figs, "perplexity is not a finite number (NaN or Inf in the logits)")
    assert change is not None
    if change > budget:
        return Check("perplexity", False, figs,
                     f"perplexity rose {change:+.3%} ({reference_ppl:.4g} -> {candidate_ppl:.4g}), budget {budget:.2%}")
    return Check("perplexity", True, figs)
