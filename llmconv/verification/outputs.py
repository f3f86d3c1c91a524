"""Outputs mode: run the reference and the candidate on the same inputs and compare every shared output.

The reference runs first on every input (and on ``--text``), its outputs are kept, and it is
released before the candidate loads; the candidate's outputs are folded into the figures as they
come. Peak memory is therefore one model plus one set of outputs.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from llmconv import progress
from llmconv.errors import GraphRunError, InputError, UsageError
from llmconv.export.tasks import base_task, is_causal
from llmconv.io import note_inputs
from llmconv.verification.report import Check, VerifyReport

DEFAULT_PPL_WINDOW = 1024  # tokens per window when neither model says how many positions it has


def compare_outputs(reference: Path, candidate: Path, *, profile: str = "auto", atol: float | None = None,
                    rtol: float | None = None, inputs: Path | None = None, text: Path | None = None, batch: int = 2,
                    seq_len: int = 16, samples: int = 2, seed: int = 0, provider: str = "cpu",
                    max_ppl_increase: float | None = None, task: str | None = None,
                    decode_steps: int | None = None, generate: int | None = None, prompts: Path | None = None,
                    localize: bool = False, reference_adapters: list[Any] | None = None,
                    adapter_runtime: str = "peft", candidate_patch: Any = None) -> VerifyReport:
    """Run both models on the same inputs and compare the outputs they share.

    Args:
        reference: the model taken as right: an hf folder (PyTorch) or an ONNX model (onnxruntime).
        candidate: the model checked, of either kind.
        profile: ``auto`` (from the candidate's dtypes and quantization ops), or exact, fp32, fp16,
            bf16, int8, int4 (thresholds in ``llmconv.verification.profiles``).
        atol: absolute tolerance of the elementwise test (overrides the profile's).
        rtol: relative tolerance of the elementwise test (overrides the profile's).
        inputs: an ``.npz`` of input arrays to use instead of synthetic inputs.
        text: a text file: the perplexity of both (causal) models on it, each with its own tokenizer.
        batch: synthetic inputs: rows per sample.
        seq_len: synthetic inputs: sequence length (odd samples use about half of it).
        samples: synthetic inputs: number of batches.
        seed: synthetic inputs: random seed.
        provider: onnxruntime execution provider: ``cpu`` or ``cuda``.
        max_ppl_increase: perplexity budget as a fraction (0.02 = 2 %), overriding the profile's.
        task: the task both models are for, when the caller knows it (the exporter does); by default
            it is read from the ONNX graph's outputs and the hf folder's config.
        decode_steps: causal LMs: cached decode steps compared after the prefill (None: the default, 0: off).
        generate: causal LMs: greedy tokens generated and compared per prompt (None: the default, 0: off).
        prompts: a text file of prompts, one per line, for the decode and generation checks.
        localize: when the models differ, name the first node (ONNX vs ONNX) or decoder layer (PyTorch vs
            ONNX) whose output leaves the profile (``report.extra["localization"]``).
        reference_adapters: LoRA adapters (:class:`llmconv.adapters.Adapter`) the reference (an hf folder) runs
            with, unmerged: ``llmconv merge``'s check of the merged model.
        adapter_runtime: who runs them: ``peft`` (PEFT's PeftModel) or ``llmconv`` (its own LoRA forward).
        candidate_patch: called with the loaded candidate (an hf folder) before it runs; changes parameters in place
            and returns what it did (merge's float32 values of the merged tensors of an fp16/bf16 base).
    Returns:
        A VerifyReport in outputs mode: one check per shared output; for causal LMs ``decode.prefill``,
        ``decode.steps``, ``decode.consistency``, ``decode.cache`` and ``generation``; with ``text``,
        ``text.logits`` and ``perplexity``.
    Raises:
        UsageError: the models cannot be run on common inputs (no shared outputs, ``text`` with a
            model that is not a causal LM, a sequence longer than the model's positions, ...).
    Example:
        >>> compare_outputs(Path("gpt2-hf"), Path("gpt2-onnx/model.onnx"), profile="fp32").passed
        True
    """
    from llmconv.verification import seq2seq
    from llmconv.verification.inputs import feed_shapes, load_inputs, plan_for, synthetic_inputs
    from llmconv.verification.metrics import OutputComparison, perplexity_check
    from llmconv.verification.profiles import candidate_profile
    from llmconv.verification.runners import describe, settle_task

    if seq2seq.applies(Path(reference), Path(candidate)):
        if reference_adapters:
            from llmconv.adapters import encoder_decoder_refused

            raise encoder_decoder_refused(Path(reference))
        return seq2seq.compare(Path(reference), Path(candidate), profile=profile, atol=atol, rtol=rtol, inputs=inputs,
                               text=text, batch=batch, seq_len=seq_len, samples=samples, seed=seed, provider=provider,
                               decode_steps=decode_steps, generate=generate, prompts=prompts, localize=localize,
                               max_ppl_increase=max_ppl_increase)
    with progress.phase("reading both models' signatures"):
        ref_sig, cand_sig = describe(Path(reference)), describe(Path(candidate))
    if reference_adapters:
        ref_sig.adapters, ref_sig.adapter_runtime = list(reference_adapters), adapter_runtime
    cand_sig.patch = candidate_patch
    ref_task, cand_task = settle_task(ref_sig, cand_sig)
    check_provider_pair(provider, ref_sig, cand_sig, candidate=Path(candidate))
    if task is not None:
        # A graph's outputs do not say its task (fill-mask and text-generation both give logits).
        if ref_sig.kind == "torch":
            ref_task = task
        if cand_sig.kind == "torch":
            cand_task = task
    notes: list[str] = [n for sig in (ref_sig, cand_sig) for n in sig.notes if n]
    notes = list(dict.fromkeys(notes))  # the same folder on both sides: one note
    # A quantized GGUF given as the reference (verify X.gguf HF): its loss is judged the same either way round.
    judged = ref_sig if ref_sig.gguf_file is not None and ref_sig.quantization and not cand_sig.quantization \
        else cand_sig
    prof = candidate_profile(profile, candidate=judged, atol=atol, rtol=rtol, max_ppl_increase=max_ppl_increase,
                             notes=notes)

    vocabs = [v for v in (ref_sig.vocab_size, cand_sig.vocab_size) if v]
    positions = [p for p in (ref_sig.max_positions, cand_sig.max_positions) if p]
    if len(set(vocabs)) > 1:
        notes.append(f"vocabulary sizes differ ({vocabs[0]} vs {vocabs[1]}): token ids drawn below {min(vocabs)}")
    plan = plan_for(ref_sig, cand_sig)
    if inputs is not None:
        feeds, meta = load_inputs(Path(inputs), plan)
    else:
        from llmconv.verification.inputs import second_length

        longest = max(seq_len, second_length(seq_len))
        for sig in (ref_sig, cand_sig):
            if sig.max_positions and longest > sig.max_positions:
                raise UsageError(f"--seq-len {seq_len} needs {longest} positions but the model has "
                                 f"{sig.max_positions}", path=sig.path,
                                 hint=f"use --seq-len {sig.max_positions} or less")
        feeds = synthetic_inputs(plan, batch=batch, seq_len=seq_len, samples=samples, seed=seed)
        meta = {"batch": batch, "seq_len": seq_len, "samples": len(feeds), "seed": seed, "shapes": feed_shapes(feeds)}
        if batch < 2 and samples < 2 and "attention_mask" in plan.wants:
            notes.append("one row in one sample: no padded row was tried (use --batch 2 or --samples 2)")
    note_inputs(feeds)  # inside a keep_failed block, verify keeps the inputs of a failing comparison

    ref_outputs = _planned_outputs(ref_sig, ref_task)
    cand_outputs = _planned_outputs(cand_sig, cand_task)
    shared = [o for o in ref_outputs if o in cand_outputs]
    if not shared:
        raise UsageError(f"the two models share no output: reference gives {', '.join(ref_outputs[:6])}; "
                         f"candidate gives {', '.join(cand_outputs[:6])}", path=Path(candidate),
                         hint="export both for the same --task")
    for label, names in (("reference", ref_outputs), ("candidate", cand_outputs)):
        only = [o for o in names if o not in shared]
        if only:
            notes.append(f"outputs only the {label} has (not compared): {', '.join(only[:8])}"
                         + (" ..." if len(only) > 8 else ""))

    texts = None
    if text is not None:
        with progress.phase(f"tokenizing {Path(text).name}"):
            texts = _tokenize_both(Path(text), ref_sig, cand_sig, ref_task, cand_task, notes)
    window = min(positions) if positions else DEFAULT_PPL_WINDOW
    dplan = _decode_plan(ref_sig, cand_sig, ref_task, cand_task, shared, decode_steps=decode_steps,
                         generate=generate, prompts=prompts, texts=texts, seq_len=seq_len, seed=seed, notes=notes)

    text_ref: list[Any] = []
    ref_results, ref_nll, ref_label, ref_trace = _run_side(
        ref_sig, ref_task, feeds, shared, provider=provider, tokens=texts[0] if texts else None, window=window,
        on_text=_keeper(text_ref), decode=dplan, keep_prefill_cache=localize, role="reference")
    # With a text, top-k agreement and KL are judged on its tokens (text.logits), not on random ids.
    forward_prof = replace(prof, min_top1=None, min_top5=None, max_kl=None) if texts is not None else prof
    comparisons = {o: OutputComparison(o, profile=forward_prof, logits=o in ("logits", "start_logits", "end_logits"))
                   for o in shared}
    text_cmp = OutputComparison("text.logits", profile=prof, logits=True)
    same_text = texts is not None and texts[0] == texts[1]

    def fold_text(i: int, logits: Any) -> None:
        if same_text and i < len(text_ref):
            kept = text_ref[i]
            text_cmp.add(kept, logits[:len(kept)])
            text_ref[i] = None

    sliding = _sliding_window(ref_sig, cand_sig)
    trimmed: set[int] = set()

    def fold(i: int, out: dict[str, Any]) -> None:
        for o in shared:
            a, b = ref_results[i][o], out[o]
            if sliding and o.startswith("present.") and a.shape != b.shape:
                a, b, kept = _trailing_overlap(a, b)
                if kept:
                    trimmed.add(kept)
            comparisons[o].add(a, b)
        ref_results[i] = {}  # free the reference's copy as soon as it is compared

    try:
        _, cand_nll, cand_label, cand_trace = _run_side(
            cand_sig, cand_task, feeds, shared, provider=provider, tokens=texts[1] if texts else None,
            window=window, sink=fold, on_text=fold_text, decode=dplan, reference=ref_trace, role="candidate")
    except GraphRunError as e:
        if not crashed_in(e, Path(candidate)):
            raise
        return crash_report(e, reference=reference, candidate=candidate, profile=prof, inputs=meta, notes=notes,
                            runners={"reference": ref_label})
    checks = [comparisons[o].check() for o in shared]
    if dplan is not None and ref_trace is not None and cand_trace is not None:
        from llmconv.verification.decode import counts_own_positions, decode_checks, unpadded_note

        decode_found, decode_notes = decode_checks(ref_trace[0], cand_trace[0], cand_trace[1], dplan, profile=prof,
                                                   sliding=sliding,
                                                   own_positions=counts_own_positions(ref_sig, cand_sig))
        checks += decode_found
        notes += unpadded_note(ref_sig, cand_sig, batched=bool(dplan.decode_steps)) + decode_notes
    if texts is not None:
        if same_text and text_cmp.n:
            text_check = text_cmp.check()
            text_check.figures["shape"] = [text_cmp.rows, text_check.figures["shape"][-1]]  # every position compared
            checks.append(text_check)
            predicted = len(texts[0]) - _windows(len(texts[0]), window)
            if text_cmp.rows < predicted:
                notes.append(f"text.logits compared the first {text_cmp.rows} of the text's {predicted} predicted "
                             f"tokens (the reference's logits kept for it are capped at {TEXT_LOGITS_BYTES >> 20} MB); "
                             "perplexity covers all of them")
        elif not same_text:
            notes.append("the two tokenizers split the text differently: only perplexity compares them on it")
    if trimmed:
        notes.append(f"sliding window {sliding}: the PyTorch cache keeps only the last {min(trimmed)} positions "
                     "of a layer's keys and values, the ONNX graph all of them; present.* were compared on the "
                     "positions both keep")
    if texts is not None and ref_nll is not None and cand_nll is not None:
        (r_sum, r_n), (c_sum, c_n) = ref_nll, cand_nll
        checks.append(perplexity_check(reference_ppl=_ppl(r_sum, r_n), candidate_ppl=_ppl(c_sum, c_n),
                                       tokens=c_n, budget=prof.max_ppl_increase))
    vocabulary = _gguf_vocabulary(ref_sig, cand_sig)
    if vocabulary is not None:
        from llmconv.verification.vocabulary import tokenizer_check

        with progress.phase("the GGUF's vocabulary against tokenizer.json"):
            check = tokenizer_check(*vocabulary, text=text)
        if check is not None:
            checks.append(check)
    # What actually ran each side: for onnxruntime, the execution provider the session reports.
    report = outputs_report(reference=reference, candidate=candidate, profile=prof, checks=checks, inputs=meta,
                            notes=notes, plan=dplan, runners={"reference": ref_label, "candidate": cand_label})
    if dplan is not None:
        decoded = dplan.mask.shape[1] + dplan.calls
        if sliding and sliding >= decoded:
            notes.append(f"sliding window {sliding}: the decoded sequences ({decoded} positions) never reach it; "
                         "use --prompts with longer prompts, or --decode-steps, to cross it")
        if not report.extra["decode"]["left_padded"]:
            notes.append("every prompt has the same length: no left-padded row was decoded (use --seq-len 4 or "
                         "more, or --prompts of different lengths)")
    if not report.passed and localize:
        from llmconv.errors import LlmconvError

        try:
            with progress.phase("localizing the difference"):
                report.extra["localization"] = _localize(ref_sig, cand_sig, feeds, dplan, ref_trace, prof, provider)
        except LlmconvError as e:  # the verdict stands; only the search for where failed
            report.extra["localization"] = {"first": None, "error": str(e),
                                            "summary": f"could not localize the difference: {e}"}
    return report


def _gguf_vocabulary(ref_sig: Any, cand_sig: Any) -> tuple[Path, Path] | None:
    """(the model folder, the GGUF file) when one side is a GGUF and the other a model folder: its vocabulary is
    compared with the folder's tokenizer.json (the logits run on token ids, which never touch it)."""
    for folder, other in ((ref_sig, cand_sig), (cand_sig, ref_sig)):
        if other.gguf_file is not None and folder.gguf_file is None and Path(folder.model_path).is_dir():
            return Path(folder.model_path), other.gguf_file
    return None


def check_provider_pair(provider: str, ref_sig: Any, cand_sig: Any, *, candidate: Path) -> None:
    """Refuse, before either model loads, an execution provider that would verify nothing (two PyTorch sides) or
    that this onnxruntime lacks; the session says later whether it really started."""
    if provider == "cpu":
        return
    if "onnxruntime" not in (ref_sig.kind, cand_sig.kind):
        raise UsageError(f"--provider {provider} picks onnxruntime's execution provider, and both models are "
                         "Hugging Face folders, which run in PyTorch on the CPU: nothing would be verified on "
                         "the GPU", path=candidate, hint="use --provider cpu, or compare with an ONNX export")
    from llmconv.verification.runners import check_provider

    check_provider(provider)


def outputs_report(*, reference: Path, candidate: Path, profile: Any, checks: list[Check], inputs: dict[str, Any],
                   notes: list[str], plan: Any, runners: dict[str, str]) -> VerifyReport:
    """An outputs-mode report: the checks, the profile's thresholds (``min_generation`` only when tokens were
    generated), the decode plan's prompts and what ran each side."""
    report = VerifyReport(mode="outputs", profile=profile.name, reference=str(reference), candidate=str(candidate),
                          checks=checks, inputs=inputs, notes=notes)
    report.extra["thresholds"] = profile.thresholds()
    if plan is None or not plan.generate:
        report.extra["thresholds"].pop("min_generation", None)
    if plan is not None:
        report.extra["decode"] = plan.meta()
    report.extra["runners"] = runners
    return report


def crashed_in(e: GraphRunError, model: Path) -> bool:
    """Whether the graph that failed to run is ``model`` (or one of its graphs): the candidate's failure is a
    verdict; the reference's is the user's input, and stays an error."""
    return e.path is not None and (Path(e.path) == model or model in Path(e.path).parents
                                   or Path(e.path).parent == model)


def crash_report(e: GraphRunError, *, reference: Path, candidate: Path, profile: Any, inputs: dict[str, Any],
                 notes: list[str], runners: dict[str, str]) -> VerifyReport:
    """The verdict on a candidate that onnxruntime cannot run on the inputs: one failing check, ``runs``."""
    where = f"{e.op} node {e.node}" if e.op and e.node else e.op or e.node or "a node"
    shape = f", on inputs of shape {e.shape}" if e.shape is not None else ""
    check = Check("runs", False, {"op": e.op, "node": e.node, "shape": e.shape, "detail": e.detail},
                  f"the candidate does not run in onnxruntime: {where}: {e.detail.rstrip('. ')}{shape}")
    report = VerifyReport(mode="outputs", profile=profile.name, reference=str(reference), candidate=str(candidate),
                          checks=[check], inputs=inputs, notes=notes)
    report.extra["thresholds"] = profile.thresholds()
    report.extra["runners"] = runners
    return report


# The note a failed verification carries: verify's, and that of a command that keeps nothing when its gate fails.
LOCALIZE_HINT = "to name the first layer or node where the two models part, rerun verify with --localize"
GATE_HINT = ("to name the first layer or node where the models part, write the output with --no-verify, then run "
             "llmconv verify SRC DST --localize")


def gate_hint(src: str | Path, dst: str | Path) -> str:
    """:data:`GATE_HINT` with the command's own source and destination in place of SRC and DST."""
    return GATE_HINT.replace("SRC DST", f"{src} {dst}")


def is_gate_hint(note: str) -> bool:
    return note.startswith(GATE_HINT.split(", then run")[0])
TEXT_LOGITS_BYTES = 256 << 20  # the reference's logits on the text kept for text.logits, at most


def _keeper(store: list[Any]) -> Any:
    """Keeps the reference's logits of each text window, up to TEXT_LOGITS_BYTES in all (the last window kept
    may be cut: at least one position's logits are always kept, so text.logits always judges some tokens)."""
    used = [0]

    def keep(i: int, logits: Any) -> None:
        row = logits.nbytes // max(len(logits), 1)
        room = max((TEXT_LOGITS_BYTES - used[0]) // max(row, 1), 0 if store else 1)
        if room and len(store) == i:
            kept = logits[:room]
            store.append(kept)
            used[0] += kept.nbytes

    return keep


def _windows(n_tokens: int, window: int) -> int:
    return sum(1 for start in range(0, n_tokens, window) if n_tokens - start >= 2)


def _decode_plan(ref_sig: Any, cand_sig: Any, ref_task: str, cand_task: str, shared: list[str], *,
                 decode_steps: int | None, generate: int | None, prompts: Path | None,
                 texts: tuple[list[int], list[int]] | None, seq_len: int, seed: int, notes: list[str]) -> Any:
    """The decode and generation checks' prompts, for a pair of causal LMs; None when they do not apply."""
    from llmconv.verification.decode import DEFAULT_DECODE_STEPS, DEFAULT_GENERATE, prompt_plan

    k = DEFAULT_DECODE_STEPS if decode_steps is None else decode_steps
    n = DEFAULT_GENERATE if generate is None else generate
    causal = is_causal(ref_task) and is_causal(cand_task) and "logits" in shared
    if not causal:
        if prompts is not None:
            raise UsageError("--prompts feeds the generation check, which needs two causal language models",
                             path=Path(prompts))
        if decode_steps or generate:
            notes.append("--decode-steps and --generate apply to causal language models only: not checked")
        return None
    if k == 0 and n == 0:
        if prompts is not None:
            raise UsageError("--prompts with --decode-steps 0 and --generate 0: nothing would use them",
                             path=Path(prompts))
        notes.append("the cached decode loop and generation were not checked (--decode-steps 0 --generate 0)")
        return None
    return prompt_plan(ref_sig, cand_sig, decode_steps=k, generate=n, prompts=prompts, texts=texts, seq_len=seq_len,
                       seed=seed)


def _localize(ref_sig: Any, cand_sig: Any, feeds: list[dict[str, Any]], dplan: Any, ref_trace: Any, prof: Any,
              provider: str) -> dict[str, Any]:
    """Where the two models part: the decode feeds when there are some (prefill, then the first cached step
    with the reference's cache), else the first forward input."""
    from llmconv.verification.decode import counts_own_positions, positions
    from llmconv.verification.inputs import empty_past
    from llmconv.verification.localize import localize

    past = next((s.past for s in (ref_sig, cand_sig) if s.past is not None), None)
    labelled: list[tuple[str, dict[str, Any]]] = []
    valid: list[Any] = []
    if dplan is not None and ref_trace is not None:
        trace = ref_trace[0]
        mask = dplan.mask
        prefill = {"input_ids": dplan.ids, "attention_mask": mask, "position_ids": positions(mask),
                   **empty_past(past, mask.shape[0])}
        labelled.append(("prefill", prefill))
        valid.append(mask)
        # A graph that counts its own positions turns its rotary keys otherwise than the other side's cache.
        if trace.prefill_cache and dplan.calls and not counts_own_positions(ref_sig, cand_sig):
            full = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
            step = {"input_ids": trace.tokens[:, :1].astype(np.int64), "attention_mask": full,
                    "position_ids": full.sum(axis=1, keepdims=True).astype(np.int64) - 1, **trace.prefill_cache}
            labelled.append(("decode step 1", step))
            valid.append(None)
    else:
        labelled.append(("input 1", feeds[0]))
        valid.append(feeds[0].get("attention_mask"))
    return localize(ref_sig, cand_sig, labelled, profile=prof, provider=provider, valid=valid)


def _sliding_window(*sigs: Any) -> int | None:
    """The attention window of a model with sliding-window layers (Mistral, Qwen2 with it on), else None."""
    for sig in sigs:
        config = sig.config or {}
        window = config.get("sliding_window")
        if isinstance(window, int) and window > 0 and config.get("use_sliding_window", True) is not False:
            return window
    return None


def _trailing_overlap(a: Any, b: Any) -> tuple[Any, Any, int]:
    """Keys/values [batch, heads, positions, dim] where one side kept only the latest positions.

    Returns:
        Both cut to the positions both hold (the last ones), and how many; or both unchanged and 0
        when they differ in any other way (a real mismatch, left for the comparison to report).
    """
    if a.ndim != 4 or b.ndim != 4 or a.shape[:2] != b.shape[:2] or a.shape[3] != b.shape[3]:
        return a, b, 0
    n = min(a.shape[2], b.shape[2])
    return a[:, :, -n:, :], b[:, :, -n:, :], n


def _ppl(nll_sum: float, n: int) -> float:
    if n <= 0 or not math.isfinite(nll_sum):
        return math.nan
    return math.exp(nll_sum / n)


def _planned_outputs(sig: Any, task: str) -> list[str]:
    """Outputs a side will give, known before it is loaded."""
    from llmconv.export.tasks import TASK_CLASSES

    if sig.kind == "onnxruntime":
        return list(sig.outputs)
    from llmconv.verification.runners import _num_layers

    out = [TASK_CLASSES[base_task(task)][1]] if base_task(task) in TASK_CLASSES else []
    if task.endswith("-with-past"):
        for i in range(_num_layers(sig.config or {})):
            out += [f"present.{i}.key", f"present.{i}.value"]
    return out


def _run_side(sig: Any, task: str, feeds: list[dict[str, Any]], names: list[str], *, provider: str,
              tokens: list[int] | None, window: int, sink: Any = None, on_text: Any = None, decode: Any = None,
              reference: Any = None, keep_prefill_cache: bool = False,
              role: str = "model") -> tuple[list[dict[str, Any]], Any, str, Any]:
    """Load one model, run every feed, the perplexity windows and the decode loop, release it (``role``, the
    side's name, is for the status shown meanwhile).

    Returns:
        (outputs per feed unless ``sink`` takes them, the summed NLL on the text, what ran it, and the
        decode loop's (trace, freely generated tokens) or None).
    """
    from llmconv.verification.runners import open_runner

    engine = "PyTorch" if sig.kind == "torch" else "onnxruntime"
    with progress.phase(f"{role} ({engine})"):
        progress.note(f"loading {Path(sig.path).name}")
        runner = open_runner(sig, task=task, provider=provider)
        results: list[dict[str, Any]] = []
        nll = None
        traced = None
        try:
            for i, feed in enumerate(feeds):
                progress.step(i + 1, len(feeds), "sample")
                out = runner.run(feed, names)
                if sink is None:
                    results.append(out)
                else:
                    sink(i, out)
            if tokens is not None:
                with progress.phase("perplexity"):
                    nll = _nll(runner, sig, tokens, window, on_logits=on_text)
            if decode is not None:
                from llmconv.verification.decode import decode_side

                traced = decode_side(runner, sig, decode, reference[0] if reference is not None else None,
                                     keep_prefill_cache=keep_prefill_cache)
        finally:
            runner.close()
    return results, nll, runner.label, traced


def _nll(runner: Any, sig: Any, tokens: list[int], window: int, *, on_logits: Any = None) -> tuple[float, int]:
    """Summed NLL over non-overlapping windows of ``window`` tokens, with no cache (empty past);
    ``on_logits(i, logits)`` gets each window's logits predicting its next tokens."""

    from llmconv.verification.decode import plain_feed, positions
    from llmconv.verification.inputs import empty_past
    from llmconv.verification.metrics import token_nll

    total, count = 0.0, 0
    for start in range(0, len(tokens), window):
        progress.step(start // window + 1, -(-len(tokens) // window), "window")
        chunk = tokens[start:start + window]
        if len(chunk) < 2:
            continue
        ids = np.asarray(chunk, dtype=np.int64)[None, :]
        n = ids.shape[1]
        mask = np.ones_like(ids)
        feed = plain_feed(sig.inputs, ids, mask, positions(mask))  # position ids only for a graph that takes them
        feed.update(empty_past(sig.past, 1))
        logits = runner.run(feed, ["logits"])["logits"][0]
        total += token_nll(logits[:-1], ids[0, 1:])
        if on_logits is not None:
            on_logits(start // window, np.asarray(logits[:-1], dtype=np.float32))
        count += n - 1
    return total, count


def _tokenize_both(text_path: Path, ref: Any, cand: Any, ref_task: str, cand_task: str,
                   notes: list[str]) -> tuple[list[int], list[int]]:
    """The text as token ids, for each side with its own tokenizer (the other's when it has none)."""
    for sig, task in ((ref, ref_task), (cand, cand_task)):
        if not is_causal(task):
            raise UsageError(f"--text measures perplexity, which needs a causal language model; this one is "
                             f"{base_task(task) or 'a graph of unknown task'}", path=sig.path)
    try:
        text = text_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("no such text file", path=text_path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the text file as UTF-8: {e}", path=text_path) from None
    if not text.strip():
        raise UsageError("the text file is empty", path=text_path)
    dirs = [ref.tokenizer_dir, cand.tokenizer_dir]
    if dirs[0] is None and dirs[1] is None:
        raise UsageError("--text needs a tokenizer, and neither model's folder has tokenizer files",
                         path=Path(ref.path), hint="copy tokenizer.json / tokenizer_config.json beside the model")
    for i, label in ((0, "reference"), (1, "candidate")):
        if dirs[i] is None:
            dirs[i] = dirs[1 - i]
            notes.append(f"the {label} has no tokenizer files: the text was tokenized with {dirs[i]}'s")
    ids = [_encode(d, text) for d in dirs]
    for i in (0, 1):
        if len(ids[i]) < 2:
            raise UsageError("the text is shorter than two tokens: no perplexity to measure", path=text_path)
    return ids[0], ids[1]


def _encode(folder: Path, text: str) -> list[int]:
    from llmconv.export.tasks import open_tokenizer

    return list(open_tokenizer(folder)(text)["input_ids"])
