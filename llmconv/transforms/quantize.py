"""Quantize a model for a CPU or GPU target with onnxruntime's own tools, verified before it is put in place.

ONNX graphs (and hf folders, exported to ONNX first) go through ``onnxruntime.quantization``:

- ``int8-dynamic``: ``quantize_dynamic`` with signed int8 weights (QInt8) on the linear layers
  (MatMul/Gemm with a constant weight) and the embedding (Gather); activations are quantized at run time.
- ``int8-static``: ``quantize_static`` in QDQ form with MinMax calibration, on the linear layers only
  (onnxruntime's default of quantizing every op wrecks transformer outputs).
- ``int4``: weight-only ``MatMulNBits`` (``MatMulNBitsQuantizer``, symmetric, block size 32), which the
  CPU and CUDA execution providers both run.
- ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with float32 inputs and
  outputs kept and numerically sensitive ops (normalisations, softmax, exp/log, ...) kept in float32.

Weight files (safetensors, PyTorch, hf folders not exported) take ``fp16`` and ``bf16`` casts, with
the overflow check of :func:`llmconv.checkpoint.cast_tensor`.

Every output is verified against its source with the matching profile (int8, int4, fp16, bf16)
before it is renamed into place; a failed verification raises NotEquivalent and leaves nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmconv import progress as status
from llmconv.errors import ConversionError, NotEquivalent, Unsupported, UsageError
from llmconv.io import atomic_output, check_destination, keep_candidate
from llmconv.verification.report import VerifyReport

QUANTIZE_SCHEMA = "llmconv.quantize/1"
TARGETS = ("cpu", "gpu")
METHODS = ("int8-dynamic", "int8-static", "int4", "fp16", "bf16")
GRAPH_METHODS = ("int8-dynamic", "int8-static", "int4", "fp16")
WEIGHT_METHODS = ("fp16", "bf16")
DEFAULT_BLOCK_SIZE = 32
DEFAULT_CALIBRATION_SAMPLES = 8
PROFILES = {"int8-dynamic": "int8", "int8-static": "int8", "int4": "int4", "fp16": "fp16", "bf16": "bf16",
            "q8_0": "int8", "q4_0": "int4", "q4_1": "int4", "q5_0": "int4", "q5_1": "int4"}
# Methods for a .gguf destination (llama.cpp's block types), and what --method auto picks there.
GGUF_METHODS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
GGUF_AUTO = "q8_0"
DEFAULT_OP_TYPES = {
    "int8-dynamic": ("MatMul", "Gemm", "Gather"),
    "int8-static": ("MatMul", "Gemm"),
    "int4": ("MatMul", "Gemm"),
}
_ALLOWED_OP_TYPES = {
    "int8-dynamic": {"MatMul", "Gemm", "Gather"},
    "int8-static": {"MatMul", "Gemm", "Gather"},
    "int4": {"MatMul", "Gemm", "Gather"},
}
# Kept in float32 by the fp16 conversion: reductions and normalisations whose intermediate values
# leave float16's range (sum of squares in RMSNorm, variance in LayerNorm), and exp/log/softmax.
FP16_KEEP_FP32 = ("Pow", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Sqrt", "Reciprocal",
                  "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                  "SkipSimplifiedLayerNormalization", "RMSNormalization", "Softmax", "LogSoftmax", "Exp", "Log",
                  "Erf", "Range", "CumSum")
_OP_KEYS = ("MatMul", "Gemm", "Gather", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear",
            "DequantizeLinear", "MatMulNBits", "GatherBlockQuantized", "Cast")


@dataclass
class Attempt:
    """One setting tried: what it was, how its output compared, how long it took.

    Attributes:
        setting: the Int8Setting (None for the methods with one setting: int4, fp16).
        verification: its comparison with the source (None with ``verify=False``).
        seconds: time to make and verify it.
        measured: on the attempt the node measurement ran on: the nodes whose quantization costs the most.
        measure_seconds: the time that measurement took.
    """

    setting: Any
    verification: VerifyReport | None
    seconds: float
    measured: list[dict[str, Any]] = field(default_factory=list)
    measure_seconds: float = 0.0

    @property
    def passed(self) -> bool | None:
        return None if self.verification is None else self.verification.passed

    @property
    def setting_label(self) -> str:
        return self.setting.label() if self.setting is not None else "the method's one setting"

    @property
    def shortfall(self) -> float:
        """How far the output is from its profile: the worst figure over its limit (1 = at the limit;
        at most 1 passes); 0 when not verified."""
        return 0.0 if self.verification is None else shortfall(self.verification)

    def figures(self) -> dict[str, dict[str, float]]:
        """Each check's quality figures (cosine, top-1/top-5, KL, perplexity change)."""
        out: dict[str, dict[str, float]] = {}
        for c in self.verification.checks if self.verification is not None else []:
            figs = {k: c.figures[k] for k in ("cosine", "top1_agreement", "top5_agreement", "kl", "relative_change",
                                              "agreement")
                    if c.figures.get(k) is not None}
            if figs:
                out[c.name] = {k: round(float(v), 6) for k, v in figs.items()}
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"setting": self.setting_label, "passed": self.passed,
                               "summary": self.verification.summary() if self.verification is not None else None,
                               "figures": self.figures(), "seconds": round(self.seconds, 3)}
        if self.setting is not None:
            out.update(self.setting.to_json())
        if self.measured:
            out["measured_nodes"] = self.measured
            out["measure_seconds"] = round(self.measure_seconds, 3)
        return out


def shortfall(v: VerifyReport) -> float:
    """The worst of a verification's figures relative to its profile's limit: ``(1 - cosine) / (1 - min)``,
    the same for top-1/top-5 and generation agreement, ``KL / max``, ``ppl change / budget``; inf for a check
    failed otherwise (NaN, shapes)."""
    th = v.extra.get("thresholds", {})
    worst = 0.0
    for c in v.checks:
        f = c.figures
        ratios = []
        for key, limit in (("cosine", "min_cosine"), ("top1_agreement", "min_top1"), ("top5_agreement", "min_top5")):
            if f.get(key) is not None and th.get(limit) is not None:
                ratios.append((1.0 - f[key]) / max(1.0 - th[limit], 1e-12))
        if f.get("kl") is not None and th.get("max_kl"):
            ratios.append(f["kl"] / th["max_kl"])
        if c.name == "generation" and f.get("agreement") is not None and th.get("min_generation") is not None:
            ratios.append((1.0 - f["agreement"]) / max(1.0 - th["min_generation"], 1e-12))
        if c.name == "perplexity" and f.get("relative_change") is not None:
            ratios.append(f["relative_change"] / max(f.get("budget") or 0.0, 1e-12))
        check_worst = max(ratios, default=0.0)
        if not c.passed and check_worst <= 1.0:
            check_worst = float("inf")
        worst = max(worst, check_worst)
    if v.missing or v.unexpected or not v.checks:
        worst = float("inf")
    return worst


@dataclass
class Int8Plan:
    """The int8 settings for a target: the first setting and the fallbacks; for a CPU, the CPU they are for
    (``settings_for``, ``chosen_by``) and this one (``this_cpu``, None for a GPU)."""

    first: Any
    per_channel_forced: bool
    settings_for: str = "gpu"
    chosen_by: str = "--target gpu"
    this_cpu: Any = None
    verified: bool = True

    def chain(self, fallback: bool) -> list[Any]:
        from llmconv.transforms.cpu import fallback_chain

        return fallback_chain(self.first, per_channel_forced=self.per_channel_forced) if fallback else [self.first]

    def cpu_json(self) -> dict[str, Any] | None:
        """``options.cpu`` of the report: None for a GPU."""
        if self.this_cpu is None:
            return None
        return {"settings_for": self.settings_for, "chosen_by": self.chosen_by, "this_cpu": self.this_cpu.to_json(),
                "verified_on": "this CPU" if self.verified else None}


def _int8_plan(*, target: str, cpu: str, per_channel: bool, verify: bool, notes: list[str]) -> Int8Plan:
    """The int8 settings for ``target``: on a CPU, by the int8 rule of the CPU they are for (``--cpu``, or
    this one); on a GPU, signed full-range weights."""
    from dataclasses import replace

    from llmconv.transforms.cpu import Int8Setting, detect_cpu, int8_rule, settings_cpu

    if target != "cpu":
        return Int8Plan(Int8Setting(per_channel=per_channel), per_channel)
    this = detect_cpu()
    isa = settings_cpu(cpu, this)
    rule = int8_rule(isa)
    first = replace(rule, per_channel=rule.per_channel or per_channel)
    why = ("7-bit weights (reduce_range), one scale per output channel: without VNNI onnxruntime's U8S8 kernels "
           "saturate on full-range weights" if first.reduce_range
           else "full-range signed weights: int8 products sum in 32 bits there")
    where = f" (this CPU{', ' + this.model if this.model else ''})" if cpu == "auto" else ""
    notes.append(f"int8 settings for {isa}{where}: {why}")
    if cpu != "auto" and isa != this.isa and verify:
        notes.append(f"--cpu {cpu}: the settings are for {cpu}, verification ran on this CPU ({this.isa}); "
                     + ("its kernels saturate where the target's do not, so the figures here are a lower bound"
                        if this.saturates and isa not in ("avx2", "avx512") else
                        "check the figures again on the deployment CPU"))
    return Int8Plan(first, per_channel, isa, "--cpu" if cpu != "auto" else "auto (this CPU)", this, verify)


@dataclass
class QuantizeReport:
    """What a quantization did, and how the result compared with its source.

    Attributes:
        source: the path given as source.
        destination: the path written.
        source_format: ``onnx``, ``hf``, ``safetensors`` or ``pytorch``.
        target: ``cpu`` or ``gpu``.
        method: the method used (``auto`` resolved).
        size_before: bytes of the float model (the exported ONNX for an hf source; its weights, when the output
            is a graph the builder wrote in its final precision, for --target gpu).
        size_after: bytes of the output's model files (None when nothing was written).
        files: the files written.
        destination_format: ``onnx`` for the graph methods, else the format written (``hf`` for a model folder),
            as convert names it.
        bytes_written: bytes of every file written (companions such as config.json included), as convert counts.
        linear_ops: linear layers (MatMul/Gemm with a float32 weight) in the source graph.
        ops_quantized: of those, how many of each op type no longer compute with float32 weights.
        embeddings_quantized: Gather nodes whose float32 table was quantized.
        ops_before: counts of the ops that quantization touches, before.
        ops_after: the same counts after (MatMulInteger, MatMulNBits, QuantizeLinear, Cast, ...).
        tensors_cast: weights mode: the tensors cast.
        attempts: ONNX graphs: each setting tried, in order, with its verdict (more than one only when
            ``--method auto`` fell back).
        options: the settings used (op types, per-channel, block size, calibration, ...).
        verification: the comparison with the source, or None with ``verify=False``.
        notes: what else the user should know.
        seconds: wall time.
    """

    source: str
    destination: str
    source_format: str
    target: str
    method: str
    size_before: int | None
    size_after: int | None
    files: list[str]
    destination_format: str | None = None
    bytes_written: int | None = None
    linear_ops: int | None = 0
    ops_quantized: dict[str, int] | None = field(default_factory=dict)
    embeddings_quantized: int | None = 0
    ops_before: dict[str, int] | None = field(default_factory=dict)
    ops_after: dict[str, int] | None = field(default_factory=dict)
    tensors_cast: int | None = 0
    options: dict[str, Any] = field(default_factory=dict)
    verification: VerifyReport | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float | None = 0.0
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def size_ratio(self) -> float | None:
        if self.size_after is None or self.size_before is None:
            return None
        return self.size_after / self.size_before if self.size_before else 0.0

    @property
    def passed(self) -> bool:
        return self.verification is None or self.verification.passed

    def to_json(self) -> dict[str, Any]:
        """The ``llmconv.quantize/1`` object, with the same keys for every method and on exit 1 (None for what is
        not known when verification failed: the output's size, its op counts)."""
        ratio = self.size_ratio
        return {
            "schema": QUANTIZE_SCHEMA, "ok": self.passed, "source": self.source, "destination": self.destination,
            "source_format": self.source_format, "destination_format": self.destination_format,
            "target": self.target, "method": self.method,
            "profile": PROFILES[self.method], "size_before": self.size_before, "size_after": self.size_after,
            "size_ratio": None if ratio is None else round(ratio, 4), "bytes_written": self.bytes_written,
            "files": self.files, "linear_ops": self.linear_ops,
            "ops_quantized": self.ops_quantized, "embeddings_quantized": self.embeddings_quantized,
            "ops_before": self.ops_before, "ops_after": self.ops_after, "tensors_cast": self.tensors_cast,
            "options": self.options, "attempts": [a.to_json() for a in self.attempts],
            "notes": self.notes, "seconds": None if self.seconds is None else round(self.seconds, 3),
            "verified": self.verification is not None and self.verification.passed,
            "verification": self.verification.to_json() if self.verification is not None else None,
        }


def _failed_report(src_path: Path, dst_path: Path, *, fmt: Any, target: str, method: str, destination_format: str,
                   verification: VerifyReport, **known: Any) -> QuantizeReport:
    """The report of a quantization whose output failed verification (``NotEquivalent.result``): what is known,
    None for the rest; nothing was written."""
    fields: dict[str, Any] = {"size_before": None, "linear_ops": None, "ops_quantized": None,
                              "embeddings_quantized": None, "ops_before": None, "ops_after": None,
                              "tensors_cast": None, "seconds": None, **known}
    return QuantizeReport(source=str(src_path), destination=str(dst_path), source_format=fmt.name, target=target,
                          method=method, size_after=None, files=[], destination_format=destination_format,
                          verification=verification, **fields)


def resolve_method(method: str, *, target: str, source_format: str, onnx_destination: bool) -> str:
    """The method ``auto`` stands for, and a check that ``method`` fits the source.

    ``auto`` is ``int8-dynamic`` for ``--target cpu`` and ``fp16`` for ``--target gpu``. A weights
    file (no graph) takes ``fp16``/``bf16`` only; ``auto`` on one with ``--target cpu`` is ``bf16``.
    """
    if target not in TARGETS:
        raise UsageError(f"unknown --target {target!r}", hint="use cpu or gpu")
    if method != "auto" and method not in METHODS:
        raise UsageError(f"unknown --method {method!r}", hint="use auto, " + ", ".join(METHODS))
    graph = source_format == "onnx" or (source_format == "hf" and (onnx_destination or method in
                                                                     ("int8-dynamic", "int8-static", "int4")))
    if method == "auto":
        if graph or source_format == "hf":
            return "int8-dynamic" if target == "cpu" else "fp16"
        return "bf16" if target == "cpu" else "fp16"
    if source_format == "onnx" and method == "bf16":
        raise Unsupported("bf16 is a weights cast; onnxruntime's CPU kernels do not run bfloat16 graphs",
                          hint="use --method fp16 for an ONNX model, or bf16 on safetensors/PyTorch/hf weights")
    if source_format in ("safetensors", "pytorch") and method not in WEIGHT_METHODS:
        raise Unsupported(f"{method} quantizes an ONNX graph, and a bare {source_format} weights file has none",
                          hint="quantize the hf model folder (it is exported to ONNX first) or an .onnx model; "
                               "weights files take --method fp16 or bf16")
    if source_format == "hf" and method == "bf16" and onnx_destination:
        raise Unsupported("bf16 ONNX graphs do not run on onnxruntime's CPU kernels",
                          hint="use --method fp16 for an ONNX destination, or a folder destination for bf16 weights")
    return method


def quantize(src: str | Path, dst: str | Path, *, target: str, method: str = "auto",
             calibration: str | Path | None = None, per_channel: bool = False, block_size: int | None = None,
             op_types: list[str] | None = None, text: str | Path | None = None, inputs: str | Path | None = None,
             atol: float | None = None,
             rtol: float | None = None, max_ppl_increase: float | None = None, provider: str = "cpu",
             calibration_samples: int | None = None, seed: int = 0, verify: bool = True, force: bool = False,
             progress: Any = None, cpu: str = "auto", decode_steps: int | None = None,
             generate: int | None = None, optimize: bool = True) -> QuantizeReport:
    """Quantize ``src`` for ``target`` and write it at ``dst``, verified against the source first.

    Args:
        src: an ONNX model (file, or folder with one), an hf folder (exported to ONNX first for the
            int8/int4 methods or an ``.onnx`` destination), or a safetensors/PyTorch weights file.
        dst: the destination: ``NAME.onnx`` (plus ``NAME.onnx.data`` for large models), a folder
            (``model.onnx`` with the source's config and tokenizer files), or a weights file/folder
            for ``fp16``/``bf16`` casts of weights.
        target: ``cpu`` or ``gpu``; picks the default method and kernel-friendly settings.
        method: ``auto``, ``int8-dynamic``, ``int8-static``, ``int4``, ``fp16`` or ``bf16``.
        calibration: int8-static: an .npz of inputs or a text file (tokenized with the model's own
            tokenizer); seeded synthetic inputs when None.
        per_channel: int8: one scale per output channel rather than per tensor.
        block_size: int4: weights per quantization block (a power of two, at least 16); None for 32.
        op_types: op types to quantize (default: MatMul, Gemm and, for int8-dynamic, Gather).
        text: verify on this text too (perplexity of both models, causal LMs).
        inputs: verify on these inputs (an .npz of name -> array) instead of seeded synthetic ones.
        atol: absolute tolerance for the verification (overrides the profile).
        rtol: relative tolerance for the verification (overrides the profile).
        max_ppl_increase: with ``text``: largest relative perplexity increase accepted.
        provider: onnxruntime execution provider for the verification (``cpu`` or ``cuda``).
        calibration_samples: int8-static: number of calibration batches from text or synthetic inputs;
            None for 8.
        seed: seed of synthetic calibration inputs.
        verify: compare the output with the source before renaming it into place.
        force: replace an existing destination.
        progress: called with bytes written (weights casts).
        cpu: int8 for ``--target cpu``: the CPU the settings are for (``auto``: this one; ``avx2``,
            ``avx512``, ``avx512-vnni``, ``arm64``). Without VNNI the weights are 7-bit (``reduce_range``).
        decode_steps: causal LMs: cached decode steps the verification compares (None: 4, 0: off).
        generate: causal LMs: greedy tokens per prompt the verification compares (None: 6, 0: off).
        optimize: for an hf causal LM the builder knows (``llmconv.export.fused``), quantize a fused generation
            graph (GroupQueryAttention, fused norms, packed projections) instead of the exporter's plain graph.
    Returns:
        A QuantizeReport.
    Raises:
        NotEquivalent: the output is not within the profile (with ``method="auto"``: after every
            fallback setting); nothing was left at ``dst``.
    Example:
        >>> quantize("model.onnx", "model-int8.onnx", target="cpu").size_ratio
        0.25
    """
    from llmconv.formats import registry

    t0 = time.perf_counter()
    src_path, dst_path = Path(src), Path(dst)
    fmt = registry.detect(src_path)
    check_destination(src_path, dst_path, force=force, reads=[calibration, text, inputs])
    registry.check_extension(dst_path, folder_hint="for a folder, give a name without this suffix")
    onnx_dst = dst_path.suffix.lower() == ".onnx"
    if not verify:
        for flag, given in (("--text", text), ("--inputs", inputs), ("--atol", atol), ("--rtol", rtol),
                            ("--max-ppl-increase", max_ppl_increase)):
            if given is not None:
                raise UsageError(f"{flag} sets how the output is verified, and --no-verify skips verification",
                                 hint=f"drop {flag} or --no-verify")
    if dst_path.suffix.lower() == ".gguf":
        return _quantize_gguf(src_path, dst_path, fmt=fmt, target=target, method=method, verify=verify, force=force,
                              progress=progress, t0=t0, text=text, atol=atol, rtol=rtol,
                              max_ppl_increase=max_ppl_increase, decode_steps=decode_steps, generate=generate,
                              refused={"--calibration": calibration, "--per-channel": per_channel or None,
                                       "--block-size": block_size, "--op-types": op_types, "--inputs": inputs,
                                       "--calibration-samples": calibration_samples,
                                       "--cpu": None if cpu == "auto" else cpu})
    if fmt.name == "gguf":
        raise UsageError("a GGUF source is quantized already or made for llama.cpp: quantize its model folder",
                         path=src_path, hint=f"llmconv convert {src_path} MODEL-DIR first (an hf folder), then "
                                             "quantize MODEL-DIR")
    if method in GGUF_METHODS:
        raise UsageError(f"--method {method} is a GGUF block type: it needs a .gguf destination",
                         hint="give DST a .gguf name, or use " + ", ".join(METHODS))
    resolved = resolve_method(method, target=target, source_format=fmt.name, onnx_destination=onnx_dst)
    from llmconv.transforms.cpu import check_cpu_choice

    check_cpu_choice(cpu)
    if cpu != "auto" and (target != "cpu" or resolved not in ("int8-dynamic", "int8-static")):
        raise UsageError(f"--cpu picks the int8 settings of --target cpu; it does not apply to {resolved} for "
                         f"--target {target}", hint="drop --cpu")
    graph = fmt.name == "onnx" or (fmt.name == "hf" and (onnx_dst or resolved in ("int8-dynamic", "int8-static",
                                                                                   "int4")))
    # A causal LM for CUDA into a folder: the fused fp16 graph (which genai and optimum load), not a weights cast.
    gpu_folder = (not graph and optimize and fmt.name == "hf" and target == "gpu" and resolved == "fp16"
                  and dst_path.suffix.lower() not in _WEIGHTS_SUFFIXES)
    listed, not_fused = _fusion_check(src_path) if gpu_folder else (False, None)
    fused_fp16 = gpu_folder and listed and not_fused is None
    graph = graph or fused_fp16
    if graph:
        from llmconv.transforms.common import onnx_destination

        onnx_destination(dst_path, what=f"the {resolved} output")
        _check_graph_options(resolved, calibration=calibration, per_channel=per_channel, block_size=block_size,
                             op_types=op_types, calibration_samples=calibration_samples)
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        calibration_samples = DEFAULT_CALIBRATION_SAMPLES if calibration_samples is None else calibration_samples
        report = _quantize_graph(src_path, dst_path, fmt=fmt, target=target, method=resolved,
                                 calibration=Path(calibration) if calibration else None, per_channel=per_channel,
                                 block_size=block_size, op_types=op_types, text=text, inputs=inputs, atol=atol,
                                 rtol=rtol,
                                 max_ppl_increase=max_ppl_increase, provider=provider,
                                 calibration_samples=calibration_samples, seed=seed, verify=verify, force=force,
                                 cpu=cpu, fallback=method == "auto", decode_steps=decode_steps, generate=generate,
                                 optimize=optimize)
    else:
        for flag, given in (("--calibration", calibration), ("--per-channel", per_channel),
                            ("--op-types", op_types), ("--text", text), ("--inputs", inputs),
                            ("--decode-steps", decode_steps), ("--generate", generate),
                            ("--block-size", block_size), ("--calibration-samples", calibration_samples)):
            if given is not None and given is not False:
                raise UsageError(f"{flag} does not apply to a {resolved} cast of weights")
        report = _cast_weights(src_path, dst_path, fmt=fmt, target=target, method=resolved, atol=atol, rtol=rtol,
                               verify=verify, force=force, progress=progress)
    if fused_fp16 and report.options.get("graph", {}).get("fused"):
        report.notes.append("a causal LM for --target gpu: written as a fused fp16 ONNX graph for CUDA; "
                            "--no-optimize casts the weights to fp16 instead")
    elif listed and not_fused is not None:
        report.notes.append(f"not fused ({not_fused}): the weights were cast to fp16 instead")
    if method == "auto":
        report.notes.insert(0, f"--method auto chose {resolved} for --target {target}")
    if target == "gpu" and resolved in ("int8-dynamic", "int8-static"):
        report.notes.append("int8 ONNX graphs are made for onnxruntime's CPU kernels; for CUDA prefer int4 "
                            "(MatMulNBits) or fp16")
    if target == "gpu" and graph and report.verification is not None:
        ran = str(report.verification.extra.get("runners", {}).get("candidate", ""))  # what the session ran on
        report.notes.append("verified on the " + ("CUDA" if "CUDAExecutionProvider" in ran else "CPU")
                            + " execution provider")
    report.seconds = time.perf_counter() - t0
    return report


_WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _quantize_gguf(src_path: Path, dst_path: Path, *, fmt: Any, target: str, method: str, verify: bool, force: bool,
                   progress: Any, t0: float, refused: dict[str, Any], **outputs: Any) -> QuantizeReport:
    """``quantize HF X.gguf``: llama.cpp's block types (Q8_0, Q4_0, ...), through the gguf package; verified through
    llmconv's reader (every value on its block's grid) and transformers' GGUF loader (outputs) before the rename."""
    from llmconv.transforms.gguf_out import weights_note, write_gguf_verified

    chosen = GGUF_AUTO if method == "auto" else method
    if chosen not in GGUF_METHODS:
        raise UsageError(f"--method {method} does not apply to a GGUF destination",
                         hint="use auto (q8_0), " + ", ".join(GGUF_METHODS))
    if fmt.name != "hf":
        raise UsageError(f"a GGUF file is made from a Hugging Face folder (config.json, tokenizer and weights); "
                         f"this is {fmt.name}", path=src_path, hint="give the model's folder")
    for flag, given in refused.items():
        if given is not None:
            raise UsageError(f"{flag} does not apply to a GGUF destination (llama.cpp's {chosen.upper()} blocks)",
                             hint=f"drop {flag}")
    if not verify:
        given = [k for k, v in outputs.items() if v is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} sets how the output is verified, and --no-verify skips "
                             "verification")
    if target != "cpu":
        raise UsageError(f"GGUF block types are for llama.cpp on any device; --target {target} picks ONNX settings",
                         hint="use --target cpu with a .gguf destination")
    options = {"gguf_method": chosen, "gguf_types": None}

    def report(result: Any, *, written: bool) -> QuantizeReport:
        notes = list(result.notes)
        if method == "auto":
            notes.insert(0, f"--method auto chose {chosen} for a .gguf destination")
        if result.outputs is not None and result.weights is not None:
            notes.insert(0, weights_note(result.weights))
        if result.verification is not None:
            notes += [n for n in result.verification.notes if n not in notes]
        return QuantizeReport(
            source=str(src_path), destination=str(dst_path), source_format=fmt.name, target=target, method=chosen,
            size_before=result.source_bytes, size_after=result.bytes_written if written else None,
            files=result.files if written else [], destination_format="gguf",
            bytes_written=result.bytes_written if written else None, linear_ops=None, ops_quantized=None,
            embeddings_quantized=None, ops_before=None, ops_after=None, tensors_cast=None,
            options={**options, "gguf_types": result.types}, verification=result.verification, notes=notes,
            seconds=time.perf_counter() - t0)

    result = write_gguf_verified(src_path, dst_path, method=chosen, verify=verify, force=force, progress=progress,
                                 outputs_options={k: v for k, v in outputs.items() if v is not None},
                                 failed=lambda r: report(r, written=False))
    return report(result, written=True)


def _fusion_check(src_path: Path) -> tuple[bool, str | None]:
    """(whether the hf folder's architecture is one ``llmconv.export.fused`` builds, why it is not fused now or
    None)."""
    from llmconv.export import fused
    from llmconv.transforms.common import read_config

    config = read_config(src_path)
    return fused.architecture(config) in fused.ARCHITECTURES, fused.unfused_reason(config)


def _graph_plan(src_path: Path, *, fmt: Any, method: str, target: str, optimize: bool,
                notes: list[str]) -> dict[str, Any]:
    """Whether the output is a fused generation graph (``llmconv.export.fused``) or the exporter's plain one, and
    why: ``options["graph"]`` in the report."""
    from llmconv.export import fused
    from llmconv.transforms.common import read_config

    if not optimize:
        return {"fused": False, "why": "--no-optimize"}
    folder = src_path if fmt.name == "hf" else (src_path if src_path.is_dir() else src_path.parent)
    config = read_config(folder)
    arch = fused.architecture(config)
    if arch not in fused.ARCHITECTURES:
        return {"fused": False, "why": fused.unfused_reason(config)}
    why = None
    if fmt.name != "hf":
        from llmconv.formats.onnx import model_file
        from llmconv.transforms.graph import load_model, op_histogram

        ops = op_histogram(load_model(model_file(src_path), with_data=False))
        if ops.get("GroupQueryAttention"):
            return {"fused": True, "tool": "the source graph (already fused)", "architecture": arch,
                    "attention": "GroupQueryAttention"}
        why = ("the source is an ONNX graph: fused graphs are built from the model's hf folder (quantize the folder "
               "to get one)")
    elif method == "int8-static":
        why = "int8-static calibrates the exporter's graph; fused graphs take int8-dynamic or int4"
    elif target == "gpu" and method not in ("fp16", "int4"):
        why = f"{method} is for the CPU; fused graphs for --target gpu are fp16 or int4"
    else:
        why = fused.unfused_reason(config)
    if why is not None:
        notes.append(f"not fused ({why}): the exporter's graph, its attention and norms as separate ops")
        return {"fused": False, "why": why}
    return {"fused": True, "tool": f"onnxruntime-genai {fused.builder_version()} model builder",
            "architecture": arch, "attention": "GroupQueryAttention (rotary inside)",
            "norms": "SkipSimplifiedLayerNormalization", "projections": "Q/K/V packed into one MatMul"}


def _take_graph(src: Path, out: Path, *, method: str, target: str) -> dict[str, Any]:
    """The builder's output, already in ``method``'s precision and named ``out.name``: moved into ``out``'s folder
    with its data file (file renames: the weights are never read)."""
    import onnx

    from llmconv.transforms import graph as g

    model = g.load_model(src, with_data=False)
    for data in g.external_data_files(model, src):
        data.replace(out.parent / data.name)
    src.replace(out)
    g.record_data_files(out)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute} if nbits else {}
    options: dict[str, Any] = {"precision": "float16 (inputs, outputs and the cache too)" if method == "fp16"
                               else "int4 weights, float16 activations", "execution_provider": "CUDA"}
    if nbits:
        options.update({"bits": attrs.get("bits"), "block_size": attrs.get("block_size"), "symmetric": True,
                        "kernel": "MatMulNBits"})
    options["tool"] = "onnxruntime-genai model builder (precision " + method + f", target {target})"
    return options


def _check_graph_options(method: str, *, calibration: Any, per_channel: bool, block_size: int | None,
                         op_types: list[str] | None, calibration_samples: int | None) -> None:
    if calibration is not None and method != "int8-static":
        raise UsageError(f"--calibration applies to --method int8-static, not {method}")
    if calibration_samples is not None and method != "int8-static":
        raise UsageError(f"--calibration-samples applies to --method int8-static, not {method}")
    if calibration_samples is not None and calibration_samples < 1:
        raise UsageError(f"--calibration-samples {calibration_samples} must be at least 1")
    if per_channel and method not in ("int8-dynamic", "int8-static"):
        raise UsageError(f"--per-channel applies to the int8 methods, not {method}")
    if block_size is not None and method != "int4":
        raise UsageError(f"--block-size applies to --method int4, not {method}")
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise UsageError(f"--block-size {block_size} is not a power of two of at least 16", hint="use 32, 64 or 128")
    if op_types is not None:
        if method not in _ALLOWED_OP_TYPES:
            raise UsageError(f"--op-types applies to the int8 and int4 methods, not {method}")
        bad = [o for o in op_types if o not in _ALLOWED_OP_TYPES[method]]
        if bad or not op_types:
            raise UsageError(f"--op-types {','.join(op_types)}: {method} quantizes "
                             + ", ".join(sorted(_ALLOWED_OP_TYPES[method])))


# ---- ONNX graphs -----------------------------------------------------------------------------------


def _quantize_graph(src_path: Path, dst_path: Path, *, fmt: Any, target: str, method: str,
                    calibration: Path | None, per_channel: bool, block_size: int, op_types: list[str] | None,
                    text: Any, inputs: Any, atol: float | None, rtol: float | None, max_ppl_increase: float | None,
                    provider: str, calibration_samples: int, seed: int, verify: bool,
                    force: bool, cpu: str = "auto", fallback: bool = False, decode_steps: int | None = None,
                    generate: int | None = None, optimize: bool = True) -> QuantizeReport:
    from llmconv.formats.onnx import model_file
    from llmconv.transforms import graph as g
    from llmconv.transforms.common import (
        build_scratch,
        check_sidecar,
        copy_companions,
        install,
        onnx_destination,
        read_config,
        rename_paths,
    )

    g.require_onnx()
    from llmconv.formats.onnx import is_seq2seq_folder
    from llmconv.verification.seq2seq import applies as seq2seq_applies

    if is_seq2seq_folder(src_path) or (fmt.name == "hf" and seq2seq_applies(src_path)):
        return _quantize_seq2seq(src_path, dst_path, fmt=fmt, target=target, method=method, per_channel=per_channel,
                                 block_size=block_size, op_types=op_types, inputs=inputs, atol=atol, rtol=rtol,
                                 text=text, provider=provider, verify=verify, force=force, cpu=cpu,
                                 calibration=calibration, decode_steps=decode_steps, generate=generate)
    folder_out = onnx_destination(dst_path, what=f"the {method} output")
    out_name = "model.onnx" if folder_out else dst_path.name
    if not folder_out:
        check_sidecar(dst_path, force=force)
    notes: list[str] = []
    if (text is not None and verify) or (calibration is not None and calibration.suffix.lower() != ".npz"):
        from llmconv.export.tasks import check_tokenizer

        # Text is tokenized with the source's tokenizer files: refuse one that needs the folder's code, or that
        # cannot be read, up front (naming the source's file, not the exported copy).
        with status.phase("reading the tokenizer (transformers)"):
            check_tokenizer(src_path if fmt.name == "hf" else model_file(src_path).parent)
    int8 = method in ("int8-dynamic", "int8-static")
    plan = _int8_plan(target=target, cpu=cpu, per_channel=per_channel, verify=verify, notes=notes) if int8 else None
    # Fallback is for --method auto (int8-dynamic on a CPU); an explicit --method is one setting.
    fallback = fallback and verify and method == "int8-dynamic"
    with build_scratch(dst_path, src=src_path) as scratch, contextlib.ExitStack() as stack:
        companions_from: Path
        graph_info = _graph_plan(src_path, fmt=fmt, method=method, target=target, optimize=optimize, notes=notes)
        reference = None  # what the output is verified against, when not the float graph it was made from
        built_as: str | None = None  # the precision the builder wrote the output in (--target gpu)
        if graph_info.get("fused") and fmt.name == "hf":
            from llmconv.export import fused
            from llmconv.export.tasks import transformers_view

            view = stack.enter_context(transformers_view(src_path, notes=notes))
            built_as = {"fp16": "fp16", "int4": "int4"}.get(method) if target == "gpu" else None
            try:
                ref_file = fused.build(view, scratch / "fused", target=target, source=src_path,
                                       precision="fp32" if built_as is None else built_as,
                                       filename=out_name if built_as is not None else "model.onnx")
            except ConversionError as e:  # the default path: fall back to the exporter's graph, and say so
                graph_info, built_as = {"fused": False, "why": e.bare_message}, None
                notes.append(f"not fused ({e.bare_message}): the exporter's graph instead")
        if graph_info.get("fused") and fmt.name == "hf":
            reference = src_path
            notes.append(f"built a fused graph with {graph_info['tool']}; verification is against the PyTorch "
                         "model in the source folder")
            companions_from = src_path
        elif fmt.name == "hf":
            ref_file = _export(src_path, scratch / "fp32", fmt=fmt, verify=verify, provider=provider,
                               decode_steps=decode_steps, generate=generate)
            notes.append(f"exported {src_path} to ONNX first; sizes and verification are against that fp32 graph")
            companions_from = src_path
            copy_companions(src_path, ref_file.parent)
        else:
            ref_file = model_file(src_path)
            companions_from = ref_file.parent
        if fmt.name == "hf":
            from llmconv.export.tasks import code_note

            notes.extend(code_note(src_path))  # the export read a view without the folder's Python
        config = read_config(companions_from)
        source_model = g.load_model(ref_file, with_data=False)
        source_files = [ref_file, *g.external_data_files(source_model, ref_file)]
        size_before = g.files_size(source_files)
        if built_as is not None:  # the builder's graph is already the output: "before" is the checkpoint
            with fmt.open(src_path) as checkpoint:
                size_before = checkpoint.total_bytes
        external = g.needs_external_data(source_model, source_files)
        renames = {ref_file: src_path if fmt.name == "onnx" else ref_file,
                   ref_file.parent: src_path if fmt.name == "hf" else ref_file.parent}

        made = itertools.count()

        def build(setting: Any) -> tuple[Path, dict[str, Any]]:
            out_dir = scratch / f"out-{next(made)}"
            out_dir.mkdir()
            out_file = out_dir / out_name
            if built_as is not None:  # the builder wrote it in its final precision (one setting: built once)
                options = _take_graph(ref_file, out_file, method=method, target=target)
            else:
                options, _, _ = _write_graph(method, ref_file, out_file, source_model, setting=setting,
                                             target=target, op_types=op_types, block_size=block_size,
                                             external=external, notes=notes, calibration=calibration, config=config,
                                             samples=calibration_samples, seed=seed)
            options["graph"] = graph_info
            if folder_out:  # what the folder will hold, there for verification too (the candidate's tokenizer)
                copy_companions(companions_from, out_dir)
                genai = ref_file.parent / "genai_config.json"  # the builder's, or an already fused source's
                if graph_info.get("fused") and genai.is_file():
                    from llmconv.export.fused import write_genai_config

                    shutil.copyfile(genai, out_dir / "genai_config.json")
                    write_genai_config(out_dir / "genai_config.json", target=target,
                                       source=genai if fmt.name == "onnx" else None)
            return out_file, options

        def make(setting: Any) -> tuple[Path, dict[str, Any], VerifyReport | None]:
            with status.phase(f"quantizing ({method})"):
                out_file, options = build(setting)
            out_dir = out_file.parent
            verification = None
            if verify:
                with status.phase("verifying against the PyTorch model" if reference else
                                  "verifying against the float graph"):
                    verification = _verify_outputs(reference or ref_file, out_file, profile=PROFILES[method],
                                                   atol=atol,
                                                   rtol=rtol, text=text, inputs=inputs, provider=provider,
                                                   max_ppl_increase=max_ppl_increase, decode_steps=decode_steps,
                                                   generate=generate)
                verification.reference, verification.candidate = str(src_path), str(dst_path)
                rename_paths(verification, {out_file: dst_path / out_name if folder_out else dst_path,
                                            out_dir: dst_path if folder_out else dst_path.parent, **renames})
            return out_file, options, verification

        attempts: list[Attempt] = []
        settings = plan.chain(fallback) if plan is not None else [None]
        chosen = _attempts(make, build, settings, attempts, fallback=fallback, ref_file=ref_file,
                           source_model=source_model, op_types=op_types, profile=PROFILES[method],
                           inputs=Path(inputs) if inputs is not None else None, notes=notes)
        out_file, options, verification = chosen
        cpu_json = plan.cpu_json() if plan is not None else None
        if cpu_json is not None:
            options["cpu"] = cpu_json
        if verification is not None and not verification.passed:
            verification.extra["attempts"] = [a.to_json() for a in attempts]
            if cpu_json is not None:
                verification.extra["cpu"] = cpu_json
            from llmconv.verification.outputs import gate_hint

            verification.notes.append(gate_hint(src_path, dst_path))
            # Inside a keep_failed block the output this report is about (the closest attempt) is kept.
            keep_candidate(out_file.parent if folder_out else out_file, dst_path, folder=folder_out,
                           prepare=lambda: folder_out and copy_companions(companions_from, out_file.parent))
            what = f"{method} output is not within the {PROFILES[method]} profile"
            if len(attempts) > 1:
                what += (f" with any of the {len(attempts)} settings tried (closest: "
                         f"{attempts[_best(attempts)].setting_label})")
            raise NotEquivalent(f"{what}: {verification.summary()}; nothing was written", report=verification,
                                path=dst_path, result=_failed_report(
                                    src_path, dst_path, fmt=fmt, target=target, method=method,
                                    destination_format="onnx", verification=verification, size_before=size_before,
                                    options=options, notes=notes, attempts=attempts))
        if verification is None:
            g.check_loads(out_file)
        if len(attempts) > 1:
            notes.append(f"the first setting ({attempts[0].setting_label}) was not within the {PROFILES[method]} "
                         f"profile; written: attempt {len(attempts)} of {len(attempts)}, "
                         f"{attempts[-1].setting_label}")
        out_dir = out_file.parent
        out_model = g.load_model(out_file, with_data=False)
        out_files = [out_file, *g.external_data_files(out_model, out_file)]
        counts = _count_ops(source_model, out_model)
        if folder_out:
            copy_companions(companions_from, out_dir, notes=notes)
        size_after = g.files_size(out_files)
        notes.extend(_left_float(out_model, method, size_before, size_after))
        written = install(out_dir, dst_path, folder=folder_out, force=force, notes=notes)
    return _quantize_report(src_path, dst_path, fmt=fmt, target=target, method=method, size_before=size_before,
                            size_after=size_after, written=written, counts=counts, options=options,
                            verification=verification, notes=notes, attempts=attempts)


def _quantize_seq2seq(src_path: Path, dst_path: Path, *, fmt: Any, target: str, method: str, per_channel: bool,
                      block_size: int, op_types: list[str] | None, inputs: Any, atol: float | None,
                      rtol: float | None, text: Any, provider: str, verify: bool, force: bool, cpu: str,
                      calibration: Path | None, decode_steps: int | None, generate: int | None) -> QuantizeReport:
    """An encoder-decoder folder (optimum's layout): every graph quantized with the same setting, the folder
    verified against the fp32 one as a whole (encoder outputs, the decoder's cached steps, generation).

    The int8 fallbacks (other settings, nodes kept in float) are for single graphs: here one setting is made
    and judged; int8-static needs calibration feeds for each graph, which are not made for decoders yet.
    """
    from llmconv.formats.onnx import SEQ2SEQ_ENCODER
    from llmconv.transforms import graph as g
    from llmconv.transforms.common import build_scratch, copy_companions, install, onnx_destination, rename_paths
    from llmconv.verification.seq2seq import graph_files

    if method == "int8-static":
        raise Unsupported("int8-static needs calibration inputs for each graph of an encoder-decoder, which llmconv "
                          "does not make yet", path=src_path, hint="use --method int8-dynamic, int4 or fp16")
    if text is not None:
        raise UsageError("--text measures perplexity, which needs a causal language model; this is an "
                         "encoder-decoder", path=Path(text))
    if not onnx_destination(dst_path, what=f"the {method} output"):
        raise UsageError(f"an encoder-decoder is several graphs ({SEQ2SEQ_ENCODER} and a decoder), which need a "
                         "folder", path=dst_path, hint=f"give a destination without the {dst_path.suffix} extension")
    notes: list[str] = []
    plan = _int8_plan(target=target, cpu=cpu, per_channel=per_channel, verify=verify, notes=notes) \
        if method == "int8-dynamic" else None
    with build_scratch(dst_path, src=src_path) as scratch:
        ref_dir = src_path
        if fmt.name == "hf":
            from llmconv.export import to_onnx
            from llmconv.export.tasks import code_note

            ref_dir = scratch / "fp32"
            to_onnx(src_path, ref_dir, src_format=fmt, dtype="keep", verify=verify, force=True, provider=provider,
                    decode_steps=decode_steps, generate=generate)
            notes.append(f"exported {src_path} to ONNX first; sizes and verification are against those fp32 graphs")
            notes.extend(code_note(src_path))
        refs = graph_files(ref_dir)
        out_dir = scratch / "out"
        out_dir.mkdir()
        options: dict[str, Any] = {}
        counts: dict[str, Any] = {"linear_ops": 0, "ops_quantized": Counter(), "embeddings_quantized": 0,
                                  "ops_before": Counter(), "ops_after": Counter()}
        size_before = size_after = 0
        kept: set[Path] = set()
        for ref in refs:
            source_model = g.load_model(ref, with_data=False)
            source_files = [ref, *g.external_data_files(source_model, ref)]
            size_before += g.files_size(source_files)
            external = g.needs_external_data(source_model, source_files)
            opts, out_model, files = _write_graph(method, ref, out_dir / ref.name, source_model,
                                                  setting=plan.first if plan is not None else None, target=target,
                                                  op_types=op_types, block_size=block_size, external=external,
                                                  notes=notes, keep=kept)
            kept |= {p.resolve() for p in files}
            size_after += g.files_size(files)
            c = _count_ops(source_model, out_model)
            counts["linear_ops"] += c["linear_ops"]
            counts["embeddings_quantized"] += c["embeddings_quantized"]
            for key in ("ops_quantized", "ops_before", "ops_after"):
                counts[key].update(c[key])
            options = {**opts, "graphs": [*options.get("graphs", []), ref.name]}
        cpu_json = plan.cpu_json() if plan is not None else None
        if cpu_json is not None:
            options["cpu"] = cpu_json
        copy_companions(src_path, out_dir, notes=notes)  # config.json: the decoder's start token
        verification = None
        if verify:
            verification = _verify_outputs(ref_dir, out_dir, profile=PROFILES[method], atol=atol, rtol=rtol,
                                           text=None, inputs=inputs, provider=provider, max_ppl_increase=None,
                                           decode_steps=decode_steps, generate=generate)
            verification.reference, verification.candidate = str(src_path), str(dst_path)
            rename_paths(verification, {out_dir: dst_path, ref_dir: src_path})
            if not verification.passed:
                from llmconv.verification.outputs import gate_hint

                verification.notes.append(gate_hint(src_path, dst_path))
                keep_candidate(out_dir, dst_path, folder=True)  # kept inside a keep_failed block
                raise NotEquivalent(f"{method} output is not within the {PROFILES[method]} profile: "
                                    f"{verification.summary()}; nothing was written", report=verification,
                                    path=dst_path, result=_failed_report(
                                        src_path, dst_path, fmt=fmt, target=target, method=method,
                                        destination_format="onnx", verification=verification,
                                        size_before=size_before, options=options, notes=notes,
                                        linear_ops=counts["linear_ops"],
                                        ops_quantized=dict(sorted(counts["ops_quantized"].items())),
                                        embeddings_quantized=counts["embeddings_quantized"],
                                        ops_before=dict(counts["ops_before"]), ops_after=dict(counts["ops_after"])))
        else:
            for out in graph_files(out_dir):
                g.check_loads(out)
        written = install(out_dir, dst_path, folder=True, force=force, notes=notes)
    return _quantize_report(src_path, dst_path, fmt=fmt, target=target, method=method, size_before=size_before,
                            size_after=size_after, written=written, counts=counts, options=options,
                            verification=verification, notes=notes, attempts=[])


def _write_graph(method: str, src: Path, out: Path, model: Any, *, setting: Any, target: str,
                 op_types: list[str] | None, block_size: int, external: bool, notes: list[str],
                 calibration: Path | None = None, config: dict[str, Any] | None = None, samples: int = 0,
                 seed: int = 0, keep: set[Path] | None = None) -> tuple[dict[str, Any], Any, list[Path]]:
    """Quantize the graph ``src`` (its structure: ``model``) with ``method`` into ``out``, record its data files, and
    remove what onnxruntime's tools left beside it (augmented models), other than ``keep``.

    Returns:
        (the options used, the output's structure, its files).
    """
    from llmconv.transforms import graph as g

    with g.quiet_onnxruntime():
        if method == "int8-dynamic":
            options = _int8_dynamic(src, out, model, setting=setting, op_types=op_types, external=external)
        elif method == "int8-static":
            options = _int8_static(src, out, model, target=target, calibration=calibration, config=config,
                                   setting=setting, op_types=op_types, samples=samples, seed=seed, external=external)
        elif method == "int4":
            options = _int4(src, out, target=target, block_size=block_size, op_types=op_types, external=external,
                            notes=notes)
        else:
            options = _fp16(src, out, external=external)
    from llmconv.export.onnx_post import drop_name_record

    # The export's name record would name weights this graph no longer holds as they were: say so instead.
    drop_name_record(out, why=f"llmconv quantize ({method}) replaced its weights, so its initializers no longer "
                              "hold the checkpoint's tensors; convert the float32 export instead (with --dtype fp16 "
                              "for half precision)")
    g.record_data_files(out)  # what a later --force onto this output may remove
    out_model = g.load_model(out, with_data=False)
    files = [out, *g.external_data_files(out_model, out)]
    # external_data_files() resolves its paths, the folder may be relative or under a link: compare resolved.
    wanted = {p.resolve() for p in files} | (keep or set())
    for p in [p for p in out.parent.iterdir() if p.resolve() not in wanted]:
        p.unlink()
    return options, out_model, files


def _quantize_report(src_path: Path, dst_path: Path, *, fmt: Any, target: str, method: str, size_before: int,
                     size_after: int, written: list[Path], counts: dict[str, Any], options: dict[str, Any],
                     verification: VerifyReport | None, notes: list[str], attempts: list[Attempt]) -> QuantizeReport:
    """The report of a graph quantization (``counts`` from :func:`_count_ops`)."""
    if method == "fp16" and target == "cpu":
        notes.append("fp16 halves the size but is meant for GPUs: on onnxruntime's CPU kernels it is no faster "
                     "than fp32")
    return QuantizeReport(
        source=str(src_path), destination=str(dst_path), source_format=fmt.name, target=target, method=method,
        size_before=size_before, size_after=size_after, files=[str(p) for p in written], destination_format="onnx",
        bytes_written=sum(f.stat().st_size for p in written for f in ([p] if p.is_file() else p.rglob("*"))
                          if f.is_file()),
        linear_ops=counts["linear_ops"], ops_quantized=dict(sorted(counts["ops_quantized"].items())),
        embeddings_quantized=counts["embeddings_quantized"], ops_before=dict(counts["ops_before"]),
        ops_after=dict(counts["ops_after"]), options=options, verification=verification, notes=notes,
        attempts=attempts)


# Leaving nodes in float: at most this share of the quantizable nodes, in steps that double (1, 2, 4, ...).
MAX_KEPT_FLOAT_SHARE = 0.25


def _attempts(make: Any, build: Any, settings: list[Any], attempts: list[Attempt], *, fallback: bool,
              ref_file: Path, source_model: Any, op_types: list[str] | None, profile: str, inputs: Path | None,
              notes: list[str]) -> tuple[Path, dict[str, Any], VerifyReport | None]:
    """Make and verify each setting in turn until one is within the profile; then, with ``fallback``, keep
    in float32 the nodes whose quantization costs the most (each measured by leaving it alone in float on
    the closest setting), a few more each time.

    Returns the passing attempt's (file, options, verification), or the closest failing one's.
    """
    import shutil
    from dataclasses import replace

    from llmconv.transforms.sensitivity import leave_one_out, quantizable_nodes

    results: list[tuple[Path, dict[str, Any], VerifyReport | None]] = []

    def run(setting: Any) -> bool:
        t0 = time.perf_counter()
        shown = (status.phase(f"attempt {len(attempts) + 1}: {Attempt(setting, None, 0).setting_label}")
                 if fallback else contextlib.nullcontext())
        with shown:
            result = make(setting)
        v = result[2]
        attempts.append(Attempt(setting, v, time.perf_counter() - t0))
        results.append(result)
        best = _best(attempts)
        for i, r in enumerate(results):  # keep only the closest attempt's files (and the one just made)
            if i not in (best, len(results) - 1) and r[0].parent.exists():
                shutil.rmtree(r[0].parent)
        return v is None or v.passed

    for setting in settings:
        if run(setting):
            return results[-1]
    if not (fallback and attempts):
        return results[_best(attempts)]
    closest = attempts[_best(attempts)]
    types = tuple(op_types or DEFAULT_OP_TYPES["int8-dynamic"])
    nodes = quantizable_nodes(_copy_model(source_model), types)
    limit = max(1, int(len(nodes) * MAX_KEPT_FLOAT_SHARE))
    base_file, base_attempt, base_exclude = results[_best(attempts)][0], closest, ()
    kept: list[str] = []
    ranked: list[str] = []  # nodes the last measurement found worth keeping, best first, not yet kept
    measured_from: tuple[str, ...] | None = None
    while len(kept) < limit:
        want = min(max(1, 2 * len(kept)), limit)  # 1, 2, 4, ... nodes in float32
        while len(kept) < want:
            if not ranked:
                if measured_from == tuple(kept) or base_exclude != tuple(kept):
                    break  # measured from here already, or try the nodes found so far before measuring again
                # Measure from where we stand: a node whose error another one hides shows once that one is float.
                done = tuple(kept)
                with status.phase("measuring which nodes cost the most (each left in float alone)"):
                    gains, seconds = leave_one_out(
                        ref_file, base_file, [n for n in nodes if n[0] not in done],
                        lambda keep, done=done: build(replace(closest.setting, exclude=done + keep))[0],
                        profile=profile, inputs=inputs)
                base_attempt.measured = [g.to_json() for g in gains[:8]]
                base_attempt.measure_seconds = seconds
                measured_from = done
                ranked = [g.node for g in gains if g.gain > 0]
                if not ranked:
                    break
            kept.append(ranked.pop(0))
        if not kept or (attempts[-1].setting is not None and attempts[-1].setting.exclude == tuple(kept)):
            break  # nothing new to try
        if run(replace(closest.setting, exclude=tuple(kept))):
            notes.append(f"{len(kept)} of {len(nodes)} quantizable nodes kept in float32, measured (each left in "
                         f"float alone) to cost the most accuracy: {', '.join(kept[:4])}"
                         + (" ..." if len(kept) > 4 else ""))
            return results[-1]
        base_file, base_attempt, base_exclude = results[-1][0], attempts[-1], tuple(kept)
        if len(kept) < want and measured_from == tuple(kept):
            break  # the measurement from here found nothing more to keep
    return results[_best(attempts)]


def _copy_model(model: Any) -> Any:
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _best(attempts: list[Attempt]) -> int:
    """Index of the attempt closest to its profile (a passing one first)."""
    return min(range(len(attempts)), key=lambda i: (attempts[i].shortfall, i))


def _export(src_path: Path, out_dir: Path, *, fmt: Any, verify: bool, provider: str,
            decode_steps: int | None = None, generate: int | None = None) -> Path:
    """hf folder -> fp32 ONNX in ``out_dir`` (through llmconv.export, itself verified against PyTorch)."""
    from llmconv.export import to_onnx
    from llmconv.formats.onnx import model_file

    out_dir.mkdir(parents=True)
    target = out_dir / "model.onnx"
    with status.phase("float32 ONNX export first"):
        to_onnx(src_path, target, src_format=fmt, dtype="keep", verify=verify, force=True, provider=provider,
                decode_steps=decode_steps, generate=generate)
    return model_file(target if target.exists() else out_dir)


def _linear_selection(model: Any, op_types: tuple[str, ...]) -> list[str]:
    """Names of the linear nodes (constant float weight) of the given op types."""
    from llmconv.transforms.graph import linear_nodes, name_nodes

    name_nodes(model)
    return [ln.node for ln in linear_nodes(model) if ln.op in op_types]


def _model_for_ort(src: Path, model: Any) -> Any:
    """What to hand onnxruntime's tools: the file when its node names are the ones selected, else the
    model (with its data) after naming its nodes the same way."""
    from llmconv.transforms.graph import load_model, name_nodes

    on_disk = load_model(src, with_data=False)
    if [n.name for n in on_disk.graph.node] == [n.name for n in model.graph.node]:
        return src
    full = load_model(src)
    name_nodes(full)
    return full


def _embedding_nodes(model: Any) -> list[str]:
    inits = {t.name for t in model.graph.initializer if t.data_type == 1 and len(t.dims) == 2}
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in inits]


_WEIGHT_TYPES = {"int8": "int8 (QInt8, signed)", "uint8": "uint8 (QUInt8, unsigned)"}


def _excluded(model: Any, names: tuple[str, ...]) -> list[str]:
    """Node names for onnxruntime's ``nodes_to_exclude``: a Gemm is also named as the MatMul the tool
    rewrites it into (``NAME_MatMul``) before it quantizes."""
    ops = {n.name: n.op_type for n in model.graph.node}
    out = []
    for name in names:
        out.append(name)
        if ops.get(name) == "Gemm":
            out.append(f"{name}_MatMul")
    return out


def _int8_dynamic(src: Path, out: Path, model: Any, *, setting: Any, op_types: list[str] | None,
                  external: bool) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    types = tuple(op_types or DEFAULT_OP_TYPES["int8-dynamic"])
    nodes = _linear_selection(model, types) + (_embedding_nodes(model) if "Gather" in types else [])
    if not nodes:
        raise Unsupported(f"the graph has no {'/'.join(types)} node with a float32 weight to quantize", path=src)
    # No node list here: the tool rewrites Gemm as MatMul under a new name before it quantizes, and
    # MatMulConstBOnly already limits it to weights (attention's activation products stay float).
    # Nodes kept in float are excluded by name (both names of a Gemm).
    model_in = _model_for_ort(src, model) if setting.exclude else src
    weight = QuantType.QInt8 if setting.weight_type == "int8" else QuantType.QUInt8
    _ort_call(src, lambda: quantize_dynamic(
        model_in, out, op_types_to_quantize=list(types), per_channel=setting.per_channel,
        reduce_range=setting.reduce_range, weight_type=weight, use_external_data_format=external,
        nodes_to_exclude=_excluded(model, setting.exclude),
        # EnableSubgraph: a merged decoder's layers sit in the branches of an If node.
        extra_options={"MatMulConstBOnly": True, "EnableSubgraph": True}))
    return {"op_types": list(types), "per_channel": setting.per_channel,
            "weight_type": _WEIGHT_TYPES[setting.weight_type], "reduce_range": setting.reduce_range,
            "kept_float": list(setting.exclude),
            "embedding": "uint8 (onnxruntime quantizes Gather tables with the activation type)"
            if "Gather" in types else "float32",
            "activations": "uint8, quantized at run time (DynamicQuantizeLinear)", "tool":
            "onnxruntime.quantization.quantize_dynamic"}


def _int8_static(src: Path, out: Path, model: Any, *, target: str, calibration: Path | None,
                 config: dict[str, Any] | None, setting: Any, op_types: list[str] | None, samples: int,
                 seed: int, external: bool) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from llmconv.transforms.calibration import FeedReader, calibration_batches

    types = tuple(op_types or DEFAULT_OP_TYPES["int8-static"])
    nodes = _linear_selection(model, types) + (_embedding_nodes(model) if "Gather" in types else [])
    if not nodes:
        raise Unsupported(f"the graph has no {'/'.join(types)} node with a float32 weight to quantize", path=src)
    nodes = [n for n in nodes if n not in setting.exclude]
    weight = QuantType.QInt8 if setting.weight_type == "int8" else QuantType.QUInt8
    with status.phase("preparing the calibration inputs"):
        feeds, described = calibration_batches(model, src, calibration, config=config, samples=samples, seed=seed)
    # uint8 activations with int8 weights (U8S8) is what onnxruntime's x86 CPU kernels run fastest
    # (measured 0.55x fp32 latency against 0.96x for S8S8); GPUs (TensorRT) want symmetric int8.
    activation = QuantType.QUInt8 if target == "cpu" else QuantType.QInt8
    model_in = _model_for_ort(src, model)
    status.note("calibrating (onnxruntime)")
    _ort_call(src, lambda: quantize_static(
        model_in, out, FeedReader(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(types),
        per_channel=setting.per_channel, reduce_range=setting.reduce_range, activation_type=activation,
        weight_type=weight, nodes_to_quantize=nodes, use_external_data_format=external,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": target == "gpu"}))
    return {"op_types": list(types), "per_channel": setting.per_channel,
            "weight_type": _WEIGHT_TYPES[setting.weight_type], "reduce_range": setting.reduce_range,
            "kept_float": list(setting.exclude),
            "activation_type": "uint8" if target == "cpu" else "int8 (symmetric)", "format": "QDQ",
            "calibration": described, "calibrate_method": "MinMax",
            "tool": "onnxruntime.quantization.quantize_static"}


def _int4(src: Path, out: Path, *, target: str, block_size: int, op_types: list[str] | None, external: bool,
          notes: list[str]) -> dict[str, Any]:
    from llmconv.transforms.graph import gemm_to_matmul, load_model, name_nodes

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # it imports onnx_ir, which onnxruntime does not declare
        from llmconv.errors import MissingDependency

        raise MissingDependency(f"onnxruntime's int4 quantizer needs the {e.name} package",
                                hint="pip install onnx-ir (or: pip install 'llmconv[onnx]')") from e

    types = tuple(op_types or DEFAULT_OP_TYPES["int4"])
    model = load_model(src)
    name_nodes(model)
    if not _linear_selection(model, types) and not ("Gather" in types and _embedding_nodes(model)):
        # A convolutional network (ResNet's features) keeps its weights in Conv nodes, which MatMulNBits is not.
        raise Unsupported(f"the graph has no {'/'.join(types)} node with a float32 weight for int4 to quantize"
                          f"{_weight_ops(model)}", path=src, hint="use --method fp16")
    if "Gemm" in types:
        rewritten = gemm_to_matmul(model)
        if rewritten:
            notes.append(f"rewrote {rewritten} Gemm nodes as MatMul+Add (same values) for onnxruntime's int4 "
                         "quantizer, which takes MatMul")
    ort_types = tuple(t for t in types if t != "Gemm")
    quant_axes = (("MatMul", 0), ("Gather", 1)) if "Gather" in ort_types else None
    # accuracy_level 4: the CPU kernel computes with int8 activations (measured 0.86x fp32 latency at
    # batch 4 x 128 against 0.94x for float compute, same perplexity); CUDA ignores the attribute.
    accuracy = 4 if target == "cpu" else None
    quantizer = _ort_call(src, lambda: MatMulNBitsQuantizer(
        model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=accuracy,
        op_types_to_quantize=ort_types, quant_axes=quant_axes))
    _ort_call(src, quantizer.process)
    from llmconv.transforms.graph import op_histogram

    made = op_histogram(quantizer.model.model)  # subgraphs too: a merged decoder's layers are in If branches
    if not (made.get("MatMulNBits") or made.get("GatherBlockQuantized")):
        raise Unsupported(f"onnxruntime's int4 quantizer took none of the graph's {'/'.join(types)} weights"
                          f"{_weight_ops(model)}", path=src, hint="use --method fp16 or int8-dynamic")
    quantizer.model.save_model_to_file(str(out), external)
    return {"op_types": list(types), "block_size": block_size, "bits": 4, "symmetric": True,
            "accuracy_level": accuracy or 0,
            "embedding": "int4 (GatherBlockQuantized)" if "Gather" in ort_types else "float32",
            "kernel": "MatMulNBits (CPU and CUDA execution providers)" + (" for --target gpu" if target == "gpu"
                                                                           else ""),
            "tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"}


def _left_float(model: Any, method: str, before: int, after: int) -> list[str]:
    """A note when an int8/int4 output is hardly smaller: which ops hold the float32 weights left (a ResNet's
    Conv layers, which the MatMul/Gemm/Gather quantizers leave alone)."""
    if method == "fp16" or after < 0.8 * before:
        return []
    sizes = {t.name: 4 * math.prod(t.dims) for t in model.graph.initializer if t.data_type == 1 and len(t.dims) >= 2}
    by_op: Counter[str] = Counter()
    for node in model.graph.node:
        for i in node.input:
            if i in sizes:
                by_op[node.op_type] += sizes.pop(i)
    if not by_op:
        return []
    op, held = by_op.most_common(1)[0]
    return [f"the output is {after / max(before, 1):.2f}x the source's size: {held / max(after, 1):.0%} of it is "
            f"float32 weights of {op} nodes, which {method} leaves in float; --method fp16 halves them"]


def _weight_ops(model: Any) -> str:
    """`` (its weights feed Conv nodes)``: the op types that take the graph's float weight matrices, for messages."""
    weights = {t.name for t in model.graph.initializer if t.data_type == 1 and len(t.dims) >= 2}
    ops = sorted({n.op_type for n in model.graph.node if any(i in weights for i in n.input)})
    return f" (its weights feed {', '.join(ops)} nodes)" if ops else ""


def _fp16(src: Path, out: Path, *, external: bool) -> dict[str, Any]:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from llmconv.transforms.graph import load_model, op_histogram, save_model, topological_sort
    from llmconv.transforms.merged import is_merged, transform_branches

    # The converter needs the graph's value types. Infer them on the graph alone, before the weights
    # are read in: with the weights a model past protobuf's 2 GB limit cannot be inferred in memory,
    # and without the types the converter leaves mixed float16/float32 inputs that onnxruntime refuses.
    model = load_model(src, with_data=False)
    present = op_histogram(model)
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32))

    def convert(graph: Any) -> Any:
        graph = _ort_call(src, lambda: onnx.shape_inference.infer_shapes(graph))
        load_external_data_for_model(graph, str(src.parent))
        converted = _ort_call(src, lambda: convert_float_to_float16(
            graph, keep_io_types=True, op_block_list=block, disable_shape_infer=True))
        _drop_duplicate_nodes(converted)
        topological_sort(converted.graph)  # the converter appends the Casts it adds at the end
        return converted

    # The converter breaks a merged decoder's If branches: each decoder it holds is converted alone, then merged.
    converted = (transform_branches(model, convert, scratch=out.with_name(f".merged-{out.name}"))
                 if is_merged(model) else convert(model))
    save_model(converted, out, external_data=external)
    kept = {op: present[op] for op in FP16_KEEP_FP32 if present.get(op)}
    return {"keep_io_types": True, "kept_fp32_ops": kept, "tool": "onnxruntime.transformers.float16"}


def _drop_duplicate_nodes(model: Any) -> int:
    """Drop repeated identical nodes (same name, op, inputs, outputs, attributes).

    The float16 converter inserts one Cast per blocked consumer of a value; when two blocked nodes
    read the same value it adds the same Cast twice, which onnxruntime refuses ("two nodes with same
    node name"). The copies compute the same output, so one is enough.
    """
    seen: set[bytes] = set()
    keep = []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key in seen:
            continue
        seen.add(key)
        keep.append(node)
    dropped = len(model.graph.node) - len(keep)
    if dropped:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return dropped


def _ort_call(src: Path, fn: Any) -> Any:
    """Run one of onnxruntime's tools; its failures on our input become ConversionError naming the model."""
    from llmconv.transforms.graph import ort_errors

    try:
        return fn()
    except ort_errors() as e:
        raise ConversionError(f"onnxruntime's quantization tool failed: {type(e).__name__}: {e}", path=src,
                              hint="inspect the model with `llmconv inspect`; try another --method") from e


def _count_ops(before: Any, after: Any) -> dict[str, Any]:
    from llmconv.transforms.graph import linear_nodes, name_nodes, op_histogram

    name_nodes(before)
    linears = linear_nodes(before)
    still_float = {ln.node for ln in linear_nodes(after)}
    quantized: Counter[str] = Counter()
    for ln in linears:
        if ln.node not in still_float and f"{ln.node}_MatMul" not in still_float:
            quantized[ln.op] += 1
    emb_before, emb_after = set(_embedding_nodes(before)), set(_embedding_nodes(after))
    hb, ha = op_histogram(before), op_histogram(after)
    return {
        "linear_ops": len(linears), "ops_quantized": dict(sorted(quantized.items())),
        "embeddings_quantized": len(emb_before - emb_after),
        "ops_before": {k: hb[k] for k in _OP_KEYS if hb.get(k)},
        "ops_after": {k: ha[k] for k in _OP_KEYS if ha.get(k)},
    }


def _verify_outputs(reference: Path, candidate: Path, *, profile: str, atol: float | None, rtol: float | None,
                    text: Any, inputs: Any, provider: str, max_ppl_increase: float | None,
                    decode_steps: int | None = None, generate: int | None = None) -> VerifyReport:
    from llmconv.verification.outputs import compare_outputs

    options: dict[str, Any] = {"decode_steps": decode_steps, "generate": generate}
    if text is not None:
        options["text"] = Path(text)
    if inputs is not None:
        options["inputs"] = Path(inputs)
    if max_ppl_increase is not None:
        options["max_ppl_increase"] = max_ppl_increase
    return compare_outputs(reference, candidate, profile=profile, atol=atol, rtol=rtol, provider=provider,
                           **options)


# ---- weights ------------------------------------------------------------------------------------


def _cast_weights(src_path: Path, dst_path: Path, *, fmt: Any, target: str, method: str, atol: float | None,
                  rtol: float | None, verify: bool, force: bool, progress: Any) -> QuantizeReport:
    from llmconv.checkpoint import CAST_TARGETS, cast_source
    from llmconv.conversion import resolve_destination
    from llmconv.formats.registry import WriteOptions
    from llmconv.verification.profiles import weights_tolerance
    from llmconv.verification.weights import compare_weights

    short = method  # fp16 / bf16
    notes: list[str] = []
    with fmt.open(src_path) as source:
        dest = resolve_destination(fmt, source, dst_path, None)
        if not dest.format.writable:
            raise UsageError(f"a {method} cast of weights cannot be written as {dest.format.name}", path=dst_path,
                             hint="give DST a .safetensors or .bin extension, or a folder")
        view, cast = cast_source(source, CAST_TARGETS[short])
        if not cast:
            notes.append(f"every floating-point tensor is already {short}; written unchanged")
        if dest.format.name == "hf":  # the folder files the hf reader leaves out, and why
            notes.extend(source.details.get("notes", []))
        size_before = _weights_bytes(source.files)
        cast_options = {"dtype": "float16" if short == "fp16" else "bfloat16", "overflow_check": True}
        options = WriteOptions(progress=progress, weights_format=dest.weights_format)
        with atomic_output(dst_path, folder=dest.folder, force=force) as tmp:
            files = dest.format.write(view, tmp, folder=dest.folder, options=options)
            verification = None
            if verify:
                name, p_atol, p_rtol = weights_tolerance(PROFILES[method])
                with dest.format.open(tmp) as written:
                    verification = compare_weights(source, written, atol=p_atol if atol is None else atol,
                                                    rtol=p_rtol if rtol is None else rtol, profile=name)
                verification.reference, verification.candidate = str(src_path), str(dst_path)
                if not verification.passed:
                    raise NotEquivalent(f"{method} weights are not within the {name} profile of the source: "
                                        f"{verification.summary()}; nothing was written", report=verification,
                                        path=dst_path, result=_failed_report(
                                            src_path, dst_path, fmt=fmt, target=target, method=method,
                                            destination_format=dest.format.name,
                                            verification=verification, size_before=size_before,
                                            tensors_cast=len(cast), notes=notes, options=cast_options))
            extra = {tmp / p.relative_to(source.path) for p in source.extra_files} if source.path.is_dir() else set()
            weight_files = [f for f in files if f not in extra]
            size_after = _weights_bytes(weight_files)
            bytes_written = sum(f.stat().st_size for f in files)
            rel = [str(dst_path / f.relative_to(tmp)) if dest.folder else str(dst_path) for f in files]
    return QuantizeReport(source=str(src_path), destination=str(dst_path), source_format=fmt.name, target=target,
                          method=method, size_before=size_before, size_after=size_after, files=rel,
                          destination_format=dest.format.name, bytes_written=bytes_written,
                          tensors_cast=len(cast), options=cast_options, verification=verification, notes=notes)


def _weights_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files if f.exists() and not f.name.endswith(".json"))
