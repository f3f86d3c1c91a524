"""Verification results as values: figures and ``passed``, never a printout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VERIFY_SCHEMA = "llmconv.verify/1"
# What verification adds beside the checks, always present in the JSON (None where it does not apply); "kept" is
# verify's record of a failing report kept by --keep-failed (llmconv.io.keep_report).
EXTRA_KEYS = ("thresholds", "runners", "decode", "localization", "graphs", "kept")


@dataclass
class Check:
    """One comparison: a tensor (weights mode) or a model output (outputs mode).

    Attributes:
        name: the tensor or output name.
        passed: whether it is within the profile's tolerances.
        figures: the measured numbers and the tolerances used, as JSON-ready values.
        reason: why it failed, in words (empty when it passed).
    """

    name: str
    passed: bool
    figures: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "passed": self.passed, **self.figures}
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class VerifyReport:
    """The result of comparing a candidate model with a reference."""

    mode: str
    profile: str
    reference: str
    candidate: str
    checks: list[Check] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    inputs: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float | None = None

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks) and not self.missing and not self.unexpected

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        """One line saying what failed, for error messages."""
        parts = []
        if not self.checks:
            parts.append("nothing to compare")
        fails = self.failures()
        if fails:
            worst = fails[0]
            parts.append(f"{len(fails)} of {len(self.checks)} checks failed (first: {worst.name}: {worst.reason})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing in candidate (first: {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected in candidate (first: {self.unexpected[0]})")
        if parts:
            return "; ".join(parts)
        return "the 1 check passed" if len(self.checks) == 1 else f"all {len(self.checks)} checks passed"

    def to_json(self) -> dict[str, Any]:
        """The ``llmconv.verify/1`` object: the same keys in every mode and on every exit (None where a figure does
        not apply: ``inputs`` in weights mode, ``decode`` without a causal LM), then what a caller added
        (quantize's ``attempts`` and ``cpu``)."""
        out: dict[str, Any] = {
            "schema": VERIFY_SCHEMA, "ok": self.passed, "mode": self.mode, "profile": self.profile,
            "reference": self.reference, "candidate": self.candidate, "inputs": self.inputs,
            "checks": [c.to_json() for c in self.checks], "missing": list(self.missing),
            "unexpected": list(self.unexpected), "tied": list(self.tied),
        }
        out.update({k: self.extra.get(k) for k in EXTRA_KEYS})
        out.update({k: v for k, v in self.extra.items() if k not in EXTRA_KEYS})
        out["notes"] = list(self.notes)
        out["seconds"] = None if self.seconds is None else round(self.seconds, 3)
        return out
