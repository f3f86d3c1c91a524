"""The CPU's int8 features, and the int8 settings onnxruntime's kernels handle well on it.

onnxruntime multiplies uint8 activations by int8 weights (U8S8). With VNNI (AVX512-VNNI, AVX-VNNI,
AMX) or on ARM64 the products are summed in 32 bits. On AVX2 and AVX-512 without VNNI the x86 kernels
use VPMADDUBSW, which sums pairs of products in 16 bits and saturates: a weight of 127 times an
activation of 255, twice, is already past 32767. onnxruntime's and optimum's advice for those CPUs is
7-bit weights (``reduce_range``, products then fit) or unsigned weights (U8U8, another kernel).

The features are those the process sees through CPUID (numpy's runtime dispatch table), not only
/proc/cpuinfo: under an emulator or a hypervisor that hides instructions the two differ, and the
kernels onnxruntime picks follow CPUID.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmconv.errors import UsageError

# --cpu names, as optimum's AutoQuantizationConfig presets (avx2, avx512, avx512_vnni, arm64).
CPU_CHOICES = ("auto", "avx2", "avx512", "avx512-vnni", "arm64")
# Kernels whose U8S8 dot products saturate (VPMADDUBSW): reduce_range or unsigned weights avoid it.
SATURATING = ("avx2", "avx512", "x86-64")


@dataclass(frozen=True)
class Int8Setting:
    """One way of quantizing to int8 with onnxruntime's tools.

    Attributes:
        weight_type: ``int8`` (QInt8, signed) or ``uint8`` (QUInt8).
        per_channel: one scale per output channel rather than per tensor.
        reduce_range: 7-bit weights, so that U8S8 products cannot saturate 16-bit sums.
        exclude: linear/embedding nodes left in float32.
    """

    weight_type: str = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    exclude: tuple[str, ...] = ()

    def label(self) -> str:
        parts = [f"{'signed' if self.weight_type == 'int8' else 'unsigned'} weights",
                 "per-channel" if self.per_channel else "per-tensor"]
        if self.reduce_range:
            parts.append("reduce_range (7-bit)")
        if self.exclude:
            parts.append(f"{len(self.exclude)} node(s) kept in float32")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"weight_type": self.weight_type, "per_channel": self.per_channel, "reduce_range": self.reduce_range,
                "kept_float": list(self.exclude)}


@dataclass(frozen=True)
class CpuInfo:
    """What this machine's CPU offers to onnxruntime's int8 kernels.

    Attributes:
        arch: ``x86_64``, ``arm64`` or what ``platform.machine()`` says.
        isa: the int8 class: ``avx512-vnni`` (also AMX), ``avx-vnni``, ``avx512``, ``avx2``, ``x86-64``
            (no AVX2), ``arm64`` or ``unknown``.
        features: the features that decided it (``avx2``, ``avx512f``, ``avx512bw``, ``avx512_vnni``,
            ``avx_vnni``, ``amx_int8``, ``asimddp``, ...).
        model: the CPU's model name, when the system says it.
        source: where the features were read.
    """

    arch: str
    isa: str
    features: tuple[str, ...] = ()
    model: str | None = None
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def saturates(self) -> bool:
        """Whether onnxruntime's U8S8 kernels saturate here (no VNNI on x86)."""
        return self.isa in SATURATING

    def describe(self) -> str:
        text = self.isa
        if self.model:
            text += f" ({self.model})"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "isa": self.isa, "features": list(self.features), "model": self.model,
                "source": self.source, "int8_saturates": self.saturates}


def _numpy_features() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy 1.x
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats
        except ImportError:
            return {}
    return dict(feats)


def _proc_cpuinfo() -> tuple[set[str], str | None]:
    """The ``flags`` (x86) or ``Features`` (ARM) of the first CPU in /proc/cpuinfo, and its model name."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set(), None
    flags: set[str] = set()
    model = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model", "hardware") and model is None:
            model = value.strip() or None
    return flags, model


def detect_cpu() -> CpuInfo:
    """This machine's int8 class, from CPUID as the process sees it (numpy's dispatch table), with
    /proc/cpuinfo for the features numpy does not list (AVX-VNNI, AMX) when both agree on the rest."""
    flags, model = _proc_cpuinfo()
    return classify(platform.machine(), _numpy_features(), flags, model)


def classify(machine: str, feats: dict[str, bool], flags: set[str], model: str | None = None) -> CpuInfo:
    """The int8 class of a CPU from what CPUID says (``feats``: numpy's names, AVX2, AVX512F, AVX512BW,
    AVX512VNNI, ASIMDDP) and what /proc/cpuinfo says (``flags``: the kernel's names).

    /proc/cpuinfo's AVX-VNNI and AMX flags count only when it agrees with CPUID on AVX2, AVX-512 and
    AVX512-VNNI: an emulator or a hypervisor that hides instructions passes the host's file through.
    """
    machine = machine.lower()
    if machine in ("aarch64", "arm64", "armv8l"):
        found = tuple(f for f in ("asimd", "asimddp", "i8mm", "sve") if feats.get(f.upper()) or f in flags)
        # Every ARM64 kernel of onnxruntime sums int8 products in 32 bits (SDOT/UDOT or widening NEON).
        return CpuInfo("arm64", "arm64", found, model, "cpuid (numpy)" if feats else "/proc/cpuinfo")
    if machine not in ("x86_64", "amd64", "i686", "i386", "x86"):
        return CpuInfo(machine or "unknown", "unknown", (), model, "")
    if feats:
        has = {"avx2": bool(feats.get("AVX2")), "avx512f": bool(feats.get("AVX512F")),
               "avx512bw": bool(feats.get("AVX512BW")), "avx512_vnni": bool(feats.get("AVX512VNNI"))}
        source = "cpuid (numpy)"
        agrees = bool(flags) and all((k in flags) == v for k, v in has.items())
        for extra in ("avx_vnni", "amx_int8"):
            has[extra] = agrees and extra in flags
        if agrees and (has["avx_vnni"] or has["amx_int8"]):
            source += " + /proc/cpuinfo"
    else:
        has = {k: k in flags for k in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")}
        source = "/proc/cpuinfo" if flags else ""
    found = tuple(k for k, v in has.items() if v)
    if has["avx512_vnni"] or has["amx_int8"]:
        isa = "avx512-vnni"
    elif has["avx_vnni"]:
        isa = "avx-vnni"
    elif has["avx512f"] and has["avx512bw"]:
        isa = "avx512"
    elif has["avx2"]:
        isa = "avx2"
    elif source:
        isa = "x86-64"
    else:
        isa = "unknown"
    return CpuInfo("x86_64", isa, found, model, source)


def int8_rule(isa: str) -> Int8Setting:
    """The first int8 setting for a CPU class: signed full-range weights, one scale per tensor, where
    products sum in 32 bits (VNNI, AMX, ARM64); where U8S8 kernels saturate, 7-bit signed weights
    (reduce_range) with one scale per output channel, which wins back most of the lost bit (measured on a
    20M Llama: top-1 0.958 per-channel against 0.854 per-tensor; the per-tensor 7-bit MiniLM keeps cosine
    0.815 of hidden states, the per-channel one 0.971)."""
    if isa in SATURATING or isa == "unknown":
        return Int8Setting(weight_type="int8", per_channel=True, reduce_range=True)
    return Int8Setting(weight_type="int8", reduce_range=False)


def check_cpu_choice(cpu: str) -> None:
    """Refuse a ``--cpu`` name that is not one of :data:`CPU_CHOICES`."""
    if cpu not in CPU_CHOICES:
        raise UsageError(f"unknown --cpu {cpu!r}", hint="use " + ", ".join(CPU_CHOICES))


def settings_cpu(cpu: str, this: CpuInfo) -> str:
    """The CPU class the int8 settings are for: ``--cpu`` as given, or this machine's for ``auto``."""
    check_cpu_choice(cpu)
    return this.isa if cpu == "auto" else cpu


def fallback_chain(first: Int8Setting, *, per_channel_forced: bool) -> list[Int8Setting]:
    """The settings ``--method auto`` tries in turn: the CPU's rule, then per-channel, then 7-bit, then
    unsigned weights (U8U8 kernels), without repeats. ``--per-channel`` keeps every attempt per-channel."""
    chain = [first,
             Int8Setting(first.weight_type, True, first.reduce_range),
             Int8Setting("int8", True, True),
             Int8Setting("uint8", True, False)]
    out: list[Int8Setting] = []
    for s in chain:
        if per_channel_forced and not s.per_channel:
            continue
        if s not in out:
            out.append(s)
    return out
