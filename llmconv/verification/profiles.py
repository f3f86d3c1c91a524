"""Tolerance profiles: how close a candidate must be to its reference, in weights and in outputs mode.

Weights mode compares stored values: ``(atol, rtol)`` per profile, ``None`` meaning bit-exact.

Outputs mode runs both models on the same inputs and checks every output they share. A profile
sets which of these tests apply (``-`` = not checked) and with what threshold:

========  =======  =======  ==========  =========  =========  ========  =============
profile   atol     rtol     min cosine  min top-1  min top-5  max KL    max ppl incr.
========  =======  =======  ==========  =========  =========  ========  =============
exact     0        0        -           -          -          -         0 %
fp32      1e-4     1e-4     0.99999     -          -          -         0.1 %
fp16      -        -        0.999       0.95       0.99       0.01      0.5 %
bf16      -        -        0.995       0.90       0.98       0.05      1 %
int8      -        -        0.99        0.90       0.97       0.1       2 %
int4      -        -        0.95        0.75       0.90       0.5       10 %
========  =======  =======  ==========  =========  =========  ========  =============

- **atol/rtol**: every element must satisfy ``|cand - ref| <= atol + rtol * |ref|`` (numpy's
  ``allclose`` rule). ``--atol``/``--rtol`` override them, and switch the elementwise test on for
  the lossy profiles too.
- **cosine**: mean cosine similarity of the output vectors (along the last axis), every output.
- **top-1 / top-5** (logits only): share of positions whose reference top-1 token is the
  candidate's top-1 / is among the candidate's top 5.
- **KL** (logits only): mean KL(reference || candidate) of the softmax distributions, in nats.
- **max ppl incr.** (``--text``): the candidate's perplexity may exceed the reference's by at
  most this fraction (``--max-ppl-increase`` overrides it).
- NaN in any output fails every profile; so does an Inf where the reference has none.

``auto`` picks the profile from the candidate: ``int4`` when it holds 4-bit weights (MatMulNBits,
int4 initializers), ``int8`` for quantization ops (QuantizeLinear/DequantizeLinear, MatMulInteger,
DynamicQuantizeLinear, ...), ``fp16``/``bf16`` when most of its floating-point weight bytes are of
that dtype, else ``fp32``. Random-init models have flat logits, so top-1 figures are harsh there:
judge quantized models on a trained checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from llmconv.errors import UsageError

# Weights mode: (atol, rtol) for comparing stored values; None means bit-exact.
WEIGHTS_TOLERANCES: dict[str, tuple[float | None, float | None]] = {
    "exact": (None, None),
    "fp32": (1e-6, 1e-5),
    "fp16": (1e-3, 1e-3),
    "bf16": (1e-2, 8e-3),
    "int8": (None, None),
    "int4": (None, None),
}

PROFILE_NAMES = ("exact", "fp32", "fp16", "bf16", "int8", "int4")


def weights_tolerance(profile: str) -> tuple[str, float | None, float | None]:
    """The profile actually used in weights mode and its (atol, rtol). ``auto`` is bit-exact."""
    name = "exact" if profile == "auto" else profile
    if name not in WEIGHTS_TOLERANCES:
        raise UsageError(f"unknown --profile {profile!r}", hint="use auto, " + ", ".join(WEIGHTS_TOLERANCES))
    if name in ("int8", "int4"):
        raise UsageError(f"profile {name} compares model outputs, not stored weights",
                         hint="use --mode outputs, or --atol to compare weights with a tolerance")
    atol, rtol = WEIGHTS_TOLERANCES[name]
    return name, atol, rtol


@dataclass(frozen=True)
class OutputsProfile:
    """Outputs-mode thresholds; ``None`` means the test is not applied.

    Attributes:
        name: the profile's name.
        atol: absolute tolerance of the elementwise test.
        rtol: relative tolerance of the elementwise test.
        min_cosine: lowest mean cosine similarity allowed.
        min_top1: lowest top-1 agreement allowed (logits).
        min_top5: lowest top-5 agreement allowed (logits).
        max_kl: highest mean KL divergence allowed (logits).
        max_ppl_increase: highest relative perplexity increase allowed (``--text``).
        min_generation: lowest mean greedy-generation agreement allowed (the share of the generated tokens
            a prompt keeps before it parts from the reference).
    """

    name: str
    atol: float | None
    rtol: float | None
    min_cosine: float | None
    min_top1: float | None
    min_top5: float | None
    max_kl: float | None
    max_ppl_increase: float
    min_generation: float | None = None

    @property
    def elementwise(self) -> bool:
        return self.atol is not None or self.rtol is not None

    def thresholds(self) -> dict[str, float]:
        """The tests this profile applies, for the report."""
        out = {"atol": self.atol, "rtol": self.rtol, "min_cosine": self.min_cosine, "min_top1": self.min_top1,
               "min_top5": self.min_top5, "max_kl": self.max_kl, "max_ppl_increase": self.max_ppl_increase,
               "min_generation": self.min_generation}
        return {k: v for k, v in out.items() if v is not None}


OUTPUT_PROFILES: dict[str, OutputsProfile] = {
    "exact": OutputsProfile("exact", 0.0, 0.0, None, None, None, None, 0.0, 1.0),
    "fp32": OutputsProfile("fp32", 1e-4, 1e-4, 0.99999, None, None, None, 0.001, 1.0),
    "fp16": OutputsProfile("fp16", None, None, 0.999, 0.95, 0.99, 0.01, 0.005, 0.8),
    "bf16": OutputsProfile("bf16", None, None, 0.995, 0.90, 0.98, 0.05, 0.01, 0.6),
    "int8": OutputsProfile("int8", None, None, 0.99, 0.90, 0.97, 0.1, 0.02, 0.4),
    "int4": OutputsProfile("int4", None, None, 0.95, 0.75, 0.90, 0.5, 0.10, 0.25),
}


def outputs_profile(name: str, *, atol: float | None = None, rtol: float | None = None,
                    max_ppl_increase: float | None = None) -> OutputsProfile:
    """The outputs-mode profile ``name`` (not ``auto``: resolve that first), with overrides applied.

    Args:
        name: exact, fp32, fp16, bf16, int8 or int4.
        atol: replaces the profile's atol; given alone on a lossy profile, rtol becomes 0.
        rtol: replaces the profile's rtol; given alone on a lossy profile, atol becomes 0.
        max_ppl_increase: replaces the perplexity budget (a fraction: 0.02 is 2 %).
    Returns:
        An OutputsProfile.
    Example:
        >>> outputs_profile("int8").max_ppl_increase
        0.02
    """
    if name not in OUTPUT_PROFILES:
        raise UsageError(f"unknown --profile {name!r}", hint="use auto, " + ", ".join(PROFILE_NAMES))
    p = OUTPUT_PROFILES[name]
    for label, value in (("--atol", atol), ("--rtol", rtol), ("--max-ppl-increase", max_ppl_increase)):
        if value is not None and value < 0:
            raise UsageError(f"{label} must be >= 0, not {value}")
    if atol is not None or rtol is not None:
        p = replace(p, atol=atol if atol is not None else (p.atol or 0.0),
                    rtol=rtol if rtol is not None else (p.rtol or 0.0))
    if max_ppl_increase is not None:
        p = replace(p, max_ppl_increase=max_ppl_increase)
    return p


def auto_profile(*, float_dtype: str | None, quantization: str | None) -> str:
    """The profile ``auto`` stands for, from the candidate's dominant float dtype and quantization.

    Args:
        float_dtype: the dtype holding most of the candidate's floating-point weight bytes.
        quantization: ``int4``, ``int8`` or None.
    Returns:
        A profile name.
    Example:
        >>> auto_profile(float_dtype="float16", quantization=None)
        'fp16'
    """
    if quantization in ("int4", "int8"):
        return quantization
    return {"float16": "fp16", "bfloat16": "bf16"}.get(float_dtype or "", "fp32")


def candidate_profile(profile: str, *, candidate: Any, atol: float | None, rtol: float | None,
                      max_ppl_increase: float | None, notes: list[str]) -> OutputsProfile:
    """The outputs profile to judge ``candidate`` by (its signature: ``float_dtype``, ``quantization``): the one
    named, or for ``auto`` the one its weights call for (``notes`` says which, and why)."""
    if profile == "auto":
        name = auto_profile(float_dtype=candidate.float_dtype, quantization=candidate.quantization)
        why = candidate.quantization or candidate.float_dtype or "no float weights"
        notes.append(f"profile auto -> {name} (candidate: {why})")
    else:
        name = profile
    return outputs_profile(name, atol=atol, rtol=rtol, max_ppl_increase=max_ppl_increase)
