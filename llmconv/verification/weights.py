"""Weights mode: tensor-by-tensor comparison of two checkpoints, one chunk at a time."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from llmconv import progress as status
from llmconv.checkpoint import TensorSource, dtype_name, left_out_when_tied
from llmconv.errors import InputError
from llmconv.verification.report import Check, VerifyReport

_CHUNK = 1 << 23  # elements compared at once: bounded memory whatever the tensor size
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.dtype.itemsize]) if t.dtype.itemsize in _INT_VIEW and t.dtype != torch.bool else t


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two flat chunks of one dtype hold the same bits.

    numpy compares in one thread; torch.equal's parallel loop ran 2-5x slower on 2 busy cores
    (1.5 GB of pairs: 0.34 s against 0.75-1.8 s). Its temporary is one bool per element of the chunk.
    """
    x, y = _bits(a).detach(), _bits(b).detach()
    try:
        xn, yn = x.numpy(), y.numpy()
    except (TypeError, RuntimeError):  # a dtype numpy does not have
        return torch.equal(x, y)
    return bool(np.array_equal(xn, yn))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def compare_tensor(name: str, ref: torch.Tensor, cand: torch.Tensor, *, atol: float | None,
                   rtol: float | None) -> Check:
    """Compare one tensor pair: bit-exact unless a tolerance is given.

    Returns:
        A Check with ``shape``, ``reference_dtype``, ``candidate_dtype``, ``equal``, ``max_abs``.
    """
    figs: dict = {"shape": list(ref.shape), "reference_dtype": dtype_name(ref.dtype),
                  "candidate_dtype": dtype_name(cand.dtype), "equal": False, "max_abs": None}
    if tuple(ref.shape) != tuple(cand.shape):
        figs["candidate_shape"] = list(cand.shape)
        return Check(name, False, figs, f"shape {list(cand.shape)} != reference {list(ref.shape)}")
    tolerant = atol is not None or rtol is not None
    a, b = _flat(ref), _flat(cand)
    equal = ref.dtype == cand.dtype
    max_abs = 0.0
    within = True
    nan_mismatch = 0
    for start in range(0, a.numel(), _CHUNK):
        ca, cb = a[start:start + _CHUNK], b[start:start + _CHUNK]
        if equal and ca.dtype == cb.dtype and _same_bits(ca, cb):
            continue
        equal = False
        fa, fb = ca.to(torch.float64), cb.to(torch.float64)
        nan_a, nan_b = torch.isnan(fa), torch.isnan(fb)
        nan_mismatch += int((nan_a != nan_b).sum())
        diff = (fa - fb).abs()
        diff = torch.where(nan_a & nan_b, torch.zeros_like(diff), diff)
        same_inf = torch.isinf(fa) & (fa == fb)
        diff = torch.where(same_inf, torch.zeros_like(diff), diff)
        m = float(torch.nan_to_num(diff, nan=math.inf, posinf=math.inf).max()) if diff.numel() else 0.0
        max_abs = max(max_abs, m)
        if tolerant:
            limit = (atol or 0.0) + (rtol or 0.0) * fa.abs()
            # An infinite difference is never within tolerance (rtol * |inf| would let it through).
            ok = ((diff <= limit) & torch.isfinite(diff)) | same_inf | (nan_a & nan_b)
            within = within and bool(ok.all())
    figs["equal"] = equal
    figs["max_abs"] = max_abs
    if equal:
        return Check(name, True, figs)
    if nan_mismatch:
        figs["nan_mismatch"] = nan_mismatch
        return Check(name, False, figs, f"NaN in {nan_mismatch} places where the other side has a number")
    if not tolerant:
        if ref.dtype != cand.dtype:
            return Check(name, False, figs, f"dtype {dtype_name(cand.dtype)} != reference {dtype_name(ref.dtype)} "
                                            "(give a profile or --atol to compare values)")
        return Check(name, False, figs, f"not bit-exact (max abs diff {max_abs:.3g})")
    figs["atol"], figs["rtol"] = atol or 0.0, rtol or 0.0
    if within:
        return Check(name, True, figs)
    return Check(name, False, figs, f"max abs diff {max_abs:.3g} beyond atol {atol or 0.0:g} + rtol {rtol or 0.0:g}")


# GGUF's block types: (values per block step from the block's values, steps of error allowed, largest |q|).
# step: Q8_0 d = amax/127; Q4_0/Q5_0 d = amax/8, amax/16 (the value of largest magnitude maps to -8/-16, so one of
# the other sign can be clipped a whole step); Q4_1/Q5_1 d = (max - min)/15, /31. The scale (and Q*_1's minimum)
# is stored in float16, which moves each value by up to |q| * d * 2^-11; twice that is allowed.
_GGUF_BLOCKS = {"Q8_0": ("amax", 127, 0.5, 127), "Q4_0": ("amax", 8, 1.0, 8), "Q5_0": ("amax", 16, 1.0, 16),
                "Q4_1": ("range", 15, 0.5, 15), "Q5_1": ("range", 31, 0.5, 31)}
_BLOCK = 32


def gguf_types(src: TensorSource) -> dict[str, str]:
    """Checkpoint name -> GGUF type name, for a GGUF source; empty for other formats."""
    return dict((src.details.get("gguf") or {}).get("types") or {})


def compare_quantized(name: str, ref: torch.Tensor, cand: torch.Tensor, qtype: str) -> Check:
    """A GGUF block-quantized tensor (``cand``, dequantized) against the values it was made from (``ref``): every
    value must lie within the rounding of its block's quantization grid (half a step; one step for Q4_0/Q5_0,
    whose grid clips one sign), computed from ``ref`` alone. A value in the wrong row, a wrong scale or a permuted
    block is many steps off.

    Returns:
        A Check with ``shape``, ``gguf_type``, ``max_abs``, ``max_steps`` (the worst error in grid steps of its
        block) and ``over`` (how many values are off their grid).
    """
    figs: dict = {"shape": list(ref.shape), "reference_dtype": dtype_name(ref.dtype), "gguf_type": qtype,
                  "equal": False, "max_abs": None, "max_steps": None}
    if tuple(ref.shape) != tuple(cand.shape):
        figs["candidate_shape"] = list(cand.shape)
        return Check(name, False, figs, f"shape {list(cand.shape)} != reference {list(ref.shape)}")
    if not ref.shape or ref.shape[-1] % _BLOCK:
        return Check(name, False, figs, f"rows of {ref.shape[-1] if ref.shape else 0} values cannot be {qtype} blocks")
    kind, levels, steps, qmax = _GGUF_BLOCKS[qtype]
    a = ref.detach().to(torch.float64).reshape(-1, _BLOCK)
    b = cand.detach().to(torch.float64).reshape(-1, _BLOCK)
    if kind == "amax":
        step = a.abs().amax(dim=1, keepdim=True) / levels
        low = torch.zeros_like(step)
    else:
        lo, hi = a.amin(dim=1, keepdim=True), a.amax(dim=1, keepdim=True)
        step, low = (hi - lo) / levels, lo.abs()
    limit = step * (steps + 2 * qmax * 2.0 ** -11) + low * 2.0 ** -10 + 1e-7 * a.abs().amax()
    diff = (a - b).abs()
    bad = ~(diff <= limit)  # NaN counts as off the grid
    figs["max_abs"] = float(torch.nan_to_num(diff, nan=math.inf).max()) if diff.numel() else 0.0
    ratio = torch.where(step > 0, diff / step.clamp_min(1e-30), torch.where(diff > 0, math.inf, 0.0))
    figs["max_steps"] = round(float(torch.nan_to_num(ratio, nan=math.inf).max()), 4) if diff.numel() else 0.0
    over = int(bad.sum())
    figs["over"] = over
    if over:
        return Check(name, False, figs, f"{over} values off their {qtype} block grid (worst {figs['max_steps']:.3g} "
                                        f"steps, max abs diff {figs['max_abs']:.3g})")
    return Check(name, True, figs)


_WIDTH = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}


def _narrower(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether a cast from ``b`` to ``a`` can lose values (float32 -> float16/bfloat16, float16 <-> bfloat16)."""
    return a != b and (_WIDTH.get(a, 0) < _WIDTH.get(b, 0) or _WIDTH.get(a) == _WIDTH.get(b) == 16)


def _compare_cast(name: str, orig: torch.Tensor, made: torch.Tensor) -> Check:
    """A GGUF float tensor (``made``) against the values it was made from: it must be exactly ``orig`` cast to the
    dtype the file stores, and a cast that loses nothing (float16 -> float32) is ``equal``. A value the narrower dtype
    cannot hold (an overflow to inf) fails."""
    if orig.dtype == made.dtype or not _narrower(made.dtype, orig.dtype):
        check = compare_tensor(name, orig.to(made.dtype) if orig.dtype != made.dtype else orig, made,
                               atol=None, rtol=None)
        if orig.dtype != made.dtype:
            check.figures.update(reference_dtype=dtype_name(orig.dtype), stored_as=dtype_name(made.dtype))
        return check
    check = compare_tensor(name, orig.to(made.dtype), made, atol=None, rtol=None)
    figs = check.figures
    figs.update(reference_dtype=dtype_name(orig.dtype), stored_as=dtype_name(made.dtype), equal=False)
    if tuple(orig.shape) != tuple(made.shape):
        return check
    a, b = _flat(orig).to(torch.float64), _flat(made).to(torch.float64)
    overflow = int((torch.isfinite(a) & ~torch.isfinite(b)).sum())
    diff = (a - b).abs()
    figs["max_abs"] = float(torch.nan_to_num(diff, nan=math.inf, posinf=math.inf).max()) if diff.numel() else 0.0
    if overflow:
        figs["overflow"] = overflow
        return Check(name, False, figs, f"{overflow} values overflow {dtype_name(made.dtype)} (stored as inf)")
    if not check.passed:
        return Check(name, False, figs, f"not the source's values cast to {dtype_name(made.dtype)}: {check.reason}")
    return Check(name, True, figs)


def _compare_gguf(name: str, orig: torch.Tensor, made: torch.Tensor, qtype: str | None, *,
                  transposed: bool) -> tuple[Check, str | None]:
    """One tensor of a GGUF file (``made``, as llmconv reads it back) against the values it was made from: on its
    block grid, or the exact cast to the dtype it is stored in. Returns the check and the profile its type loses to
    (int4, int8, bf16, fp16; None for a lossless one)."""
    if qtype in _GGUF_BLOCKS:
        if transposed and orig.dim() == 2 and made.dim() == 2:  # blocks run along the stored rows
            orig, made = orig.t(), made.t()
        return compare_quantized(name, orig, made, qtype), "int8" if qtype == "Q8_0" else "int4"
    loses = {"float16": "fp16", "bfloat16": "bf16"}.get(dtype_name(made.dtype)) \
        if _narrower(made.dtype, orig.dtype) else None
    return _compare_cast(name, orig, made), loses


def _worst(max_abs: float | None) -> float:
    return math.inf if max_abs is None or math.isnan(max_abs) else max_abs


def _unmatched(side: TensorSource, other: TensorSource) -> tuple[list[str], list[str]]:
    """Names of ``side`` that ``other`` lacks: (tied heads that ``other`` may leave out, the rest).

    A tied head counts as present only where ``other`` ties it again on load; an hf folder whose
    config does not tie it would load a randomly initialised head in its place.
    """
    tied, absent = [], []
    for n in side.infos:
        if n in other.infos:
            continue
        canon = side.aliases.get(n)
        # A bare weights file has no config: the side that has one says whether the model ties the name again.
        config = other.config if other.config is not None else side.config
        ok = canon is not None and canon in other.infos and left_out_when_tied(n, canon, config)
        (tied if ok else absent).append(n)
    return tied, absent


def require_tensors(src: TensorSource, *, what: str) -> None:
    """Refuse a checkpoint that holds no tensors: converting it would write an empty model, and comparing
    it would call two models equivalent on no evidence at all.

    Args:
        src: the opened checkpoint.
        what: the action refused, for the message ("convert", "compare", ...).
    Raises:
        InputError: ``src`` holds no tensors.
    """
    if not src.infos:
        raise InputError(f"holds no tensors; nothing to {what}", path=src.path,
                         hint="give the model's weights: an empty state dict or a safetensors header without tensors "
                              "holds none")


def compare_weights(reference: TensorSource, candidate: TensorSource, *, atol: float | None = None,
                    rtol: float | None = None, profile: str = "exact", progress=None) -> VerifyReport:
    """Compare two checkpoints tensor by tensor.

    Tied aliases count as present: a safetensors file that stores GPT-2's embedding once matches a
    state dict holding both ``transformer.wte.weight`` and the tied ``lm_head.weight``.

    Args:
        reference: the model taken as right.
        candidate: the model checked.
        atol: absolute tolerance; ``None`` (with ``rtol`` None) means bit-exact.
        rtol: relative tolerance.
        profile: the profile name recorded in the report.
        progress: called with the bytes of each reference tensor compared.
    Returns:
        A VerifyReport in weights mode, failing tensors first sorted by max_abs.
    Raises:
        InputError: either side holds no tensors.
    Example:
        >>> compare_weights(open_checkpoint(a), open_checkpoint(b)).passed
    """
    require_tensors(reference, what="compare")
    require_tensors(candidate, what="compare")
    report = VerifyReport(mode="weights", profile=profile, reference=str(reference.path),
                          candidate=str(candidate.path))
    cand_names = set(candidate.infos)
    report.tied, report.missing = _unmatched(reference, candidate)
    tied, report.unexpected = _unmatched(candidate, reference)
    report.tied += tied
    checks = []
    compared = [n for n in reference.infos if n in cand_names]
    # A GGUF side: its block-quantized tensors are judged on their grid; its float tensors must be the other side's
    # values in the dtype the file stores them in (llama.cpp keeps norms in float32, falls back to float16).
    gguf_side = "candidate" if gguf_types(candidate) else "reference" if gguf_types(reference) else None
    by_file = gguf_side is not None and atol is None and rtol is None
    info = ((candidate if gguf_side == "candidate" else reference).details.get("gguf") or {}) if by_file else {}
    lossy: set[str] = set()  # what the GGUF side's types lose: its report is judged by that profile
    if by_file:
        report.notes.append(f"the {gguf_side} is GGUF: its float tensors are compared bit for bit with the other "
                            "side's cast to the dtype the file stores, its Q8_0/Q4_x/Q5_x tensors against their "
                            "block grid")
    with status.bytes(sum(reference.infos[n].nbytes for n in compared), "bytes compared", also=progress) as advance:
        for n in compared:
            ref_t, cand_t = reference.tensor(n), candidate.tensor(n)
            if not by_file:
                checks.append(compare_tensor(n, ref_t, cand_t, atol=atol, rtol=rtol))
            else:
                orig, made = (ref_t, cand_t) if gguf_side == "candidate" else (cand_t, ref_t)
                check, loses = _compare_gguf(n, orig, made, info["types"].get(n),
                                             transposed=n in info.get("transposed", ()))
                checks.append(check)
                if loses:
                    lossy.add(loses)
            del ref_t, cand_t
            advance(reference.infos[n].nbytes)
    if by_file and profile == "exact" and lossy:
        # The loosest of what the file's types lose: q4_*/q5_* ~ int4, q8_0 ~ int8, bf16, fp16.
        report.profile = next(p for p in ("int4", "int8", "bf16", "fp16") if p in lossy)
    configs = [s.details.get("adapter_config") for s in (reference, candidate)]
    if all(c is not None for c in configs):  # two adapters (a bare weights file of one holds its tensors only)
        checks.append(adapter_config_check(*configs))
    # Failing first, worst first; a failure with no figure (a shape or name mismatch) is the worst.
    checks.sort(key=lambda c: (c.passed, 0.0 if c.passed else -(_worst(c.figures.get("max_abs")))))
    report.checks = checks
    return report


# What an adapter's update depends on besides its tensors: two adapters with equal tensors and different values of
# these are different adapters (an alpha of 16 instead of 8 doubles the update).
ADAPTER_KEYS = ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
                "use_dora", "lora_bias", "bias")


_ADAPTER_DEFAULTS = {"r": 8, "lora_alpha": 8, "use_rslora": False, "fan_in_fan_out": False, "use_dora": False,
                     "lora_bias": False, "bias": "none"}


def adapter_config_check(ref: dict[str, Any], cand: dict[str, Any]) -> Check:
    """The ``adapter_config`` check of two LoRA adapters' weights: the settings that change the update are equal."""

    def norm(config: dict[str, Any], key: str) -> Any:  # PEFT's default when absent; target lists in any order
        v = config.get(key, _ADAPTER_DEFAULTS.get(key))
        if v in (None, {}, [], ""):
            return None
        return sorted(v) if isinstance(v, list) else v

    differ = {k: (ref.get(k), cand.get(k)) for k in ADAPTER_KEYS if norm(ref, k) != norm(cand, k)}
    reason = "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in differ.items())
    return Check("adapter_config", not differ, {"equal": not differ, "keys": list(ADAPTER_KEYS)},
                 f"the adapter settings differ ({reason})" if differ else "")


def compare_graph_weights(checkpoint: TensorSource, graph: TensorSource, *, atol: float | None = None,
                          rtol: float | None = None) -> Check:
    """Compare the weights of a graph llmconv exported with a checkpoint's, tensor by tensor, through the graph's
    name record (:mod:`llmconv.formats.onnx`): every initializer holding a checkpoint tensor is compared with it,
    copies included (GPT-2's embedding is also its transposed output head).

    Outputs mode on random token ids never reads most rows of an embedding; this reads them all.

    Args:
        checkpoint: the named weights (an hf folder, safetensors, PyTorch).
        graph: the ONNX graph (:func:`llmconv.formats.onnx.open_model`), which carries a usable name record.
        atol: absolute tolerance; ``None`` (with ``rtol`` None) means bit-exact, as an export copies the weights.
        rtol: relative tolerance.
    Returns:
        One check, ``weights``: ``tensors`` compared, ``initializers`` read, ``differ`` (how many tensors),
        ``equal`` (all bit-exact), ``max_abs`` and ``worst`` (the tensor furthest off, and the initializer holding
        it), ``failed`` (the first ten that differ), and the checkpoint tensors the graph does not hold
        (``not_in_graph``) or its record does not know (``missing``).
    Example:
        >>> with open_checkpoint(Path("gpt2-hf")) as ck, open_model(Path("gpt2-onnx")) as g:
        ...     compare_graph_weights(ck, g).passed
        True
    """
    from llmconv.formats.onnx import held_tensor, read_name_record, record_mismatch

    record = read_name_record(graph.files[0])
    if record is None or record.unavailable is not None:
        raise ValueError("compare_graph_weights needs a graph with a usable name record")
    figs: dict = {"tensors": 0, "initializers": 0, "differ": 0, "equal": False, "max_abs": None, "worst": None}
    mismatch = record_mismatch(record, graph)
    if mismatch is not None:
        return Check("weights", False, figs, f"the graph's name record no longer matches its initializers: {mismatch}")
    missing, not_in_graph, failed = [], [], []
    worst: tuple[float, str, Check] | None = None
    equal, max_abs = True, 0.0
    for name in checkpoint.infos:
        if name in checkpoint.aliases or name in record.aliases:
            continue  # the tensor it shares storage with is compared
        recorded = record.tensors.get(name)
        if recorded is None:
            missing.append(name)
            continue
        if not recorded.holders:
            not_in_graph.append(name)
            continue
        figs["tensors"] += 1
        ref = checkpoint.tensor(name)
        for h in recorded.holders:
            figs["initializers"] += 1
            where = f"{name} (initializer {h.initializer!r}{', transposed' if h.transform == 'transpose' else ''})"
            check = compare_tensor(where, ref, held_tensor(graph, h, ref.dtype), atol=atol, rtol=rtol)
            equal = equal and bool(check.figures.get("equal"))
            score = _worst(check.figures.get("max_abs"))
            max_abs = max(max_abs, score)
            if not check.passed:
                if not failed or failed[-1] != name:
                    failed.append(name)
                if worst is None or score > worst[0]:
                    worst = (score, where, check)
        del ref
    figs.update(differ=len(failed), equal=equal and figs["tensors"] > 0, max_abs=max_abs if figs["tensors"] else None)
    if failed:
        figs["failed"] = failed[:10]
    if not_in_graph:
        figs["not_in_graph"] = not_in_graph
    if missing:
        figs["missing"] = missing
    if worst is not None:
        figs["worst"] = worst[1]
        return Check("weights", False, figs, f"{len(failed)} of {figs['tensors']} tensors differ from the "
                                             f"checkpoint's; worst {worst[1]}: {worst[2].reason}")
    if missing:
        return Check("weights", False, figs, f"the checkpoint holds {len(missing)} tensor(s) the graph's name record "
                                             f"does not know (first: {missing[0]}): the graph was exported from "
                                             "another checkpoint")
    if not figs["tensors"]:
        return Check("weights", False, figs, "the graph holds no tensor of the checkpoint")
    return Check("weights", True, figs)
