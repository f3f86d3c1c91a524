"""Tolerance profiles (being extended with outputs-mode figures)."""

from __future__ import annotations

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
