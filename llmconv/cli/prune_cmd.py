"""llmconv prune SRC DST --sparsity FRACTION"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from llmconv.cli import options as o
from llmconv.cli.output import escape, fmt_num, kv_table, out, print_json, run_recorded

HELP = ("Magnitude-prune the linear-layer weights (embeddings, output head, norms and biases untouched unless "
        "--include names them) of safetensors, PyTorch, hf folders or ONNX models. Patterns: unstructured; "
        "2:4 (two zeros in every four weights along the input dimension, for GPU sparse tensor cores); rows "
        "(whole output rows zeroed by L2 norm, shapes kept so the model still loads). The output is checked "
        "before it is put in place: pattern and sparsity of every pruned tensor and, for hf folders and ONNX, "
        "output quality against the source (--min-top1, --max-ppl-increase with --text); exit 1 if a check "
        "fails.")
EPILOG = ("Examples: [bold]llmconv prune model.safetensors pruned.safetensors --sparsity 0.5[/]  ·  "
          "[bold]llmconv prune hf-folder out --pattern 2:4 --text fixtures/data/heldout.txt "
          "--max-ppl-increase 0.3[/]  ·  "
          "[bold]llmconv prune model.onnx rows.onnx --sparsity 0.1 --pattern rows --exclude '*mlp*'[/]")
_SHOWN = 12
# The JSON object's keys besides schema, ok and error, on every exit (llmconv.prune/1).
JSON_FIELDS = ("source", "destination", "source_format", "destination_format", "pattern", "sparsity", "achieved",
               "tensors", "skipped", "files", "bytes_written", "thresholds", "notes", "seconds", "verified",
               "verification", "quality")


def command(
    src: o.Src,
    dst: o.Dst,
    sparsity: Annotated[float | None, typer.Option(
        "--sparsity", help="Fraction to prune: of weights (unstructured) or of output rows (rows); "
                           "2:4 is always 0.5.")] = None,
    pattern: Annotated[str, typer.Option("--pattern", help="unstructured|2:4|rows.")] = "unstructured",
    include: Annotated[list[str] | None, typer.Option(
        "--include", help="Prune only tensors whose name (or ONNX node name) matches this shell pattern; "
                          "repeatable. Replaces the default selection.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", help="Leave tensors matching this shell pattern alone; repeatable.")] = None,
    text: o.Text = None,
    inputs: o.Inputs = None,
    min_top1: Annotated[float | None, typer.Option(
        "--min-top1", help="Quality check: least top-1 agreement with the source's logits (default 0.5).")] = None,
    max_ppl_increase: o.MaxPplIncrease = None,
    decode_steps: o.DecodeSteps = None,
    generate: o.Generate = None,
    provider: o.Provider = "cpu",
    verify: o.Verify = True,
    force: o.Force = False,
    quiet: o.Quiet = False,
    json_output: o.Json = False,
    junit: o.Junit = None,
    keep_failed: o.KeepFailed = None,
) -> None:
    from llmconv.io import human_size
    from llmconv.transforms.prune import prune

    t0 = time.perf_counter()
    if junit is not None:
        from llmconv.verification.junit import check_report_path

        check_report_path(junit, models=[src], writes=[dst], reads={"--text": text, "--inputs": inputs})
    report = run_recorded(
        "prune", lambda: prune(src, dst, sparsity=sparsity, pattern=pattern, include=include, exclude=exclude,
                               text=text, inputs=inputs, min_top1=min_top1, max_ppl_increase=max_ppl_increase,
                               provider=provider, verify=verify, force=force, decode_steps=decode_steps,
                               generate=generate),
        junit=junit, keep=keep_failed, t0=t0,
        summary=lambda r: f"{r.pattern} at {fmt_num(r.sparsity)}: {len(r.tensors)} tensors, {r.overall:.2%} zeros")
    if json_output:
        print_json(report.to_json())
        return
    if quiet:
        return
    out.print(f"[green]pruned[/] {escape(report.source)} ({report.source_format}) -> {escape(report.destination)}: "
              f"{report.pattern} at {fmt_num(report.sparsity)}")
    rows = [
        ("tensors pruned", len(report.tensors)),
        ("sparsity", f"{report.overall:.2%} of the pruned tensors, {report.model_sparsity:.2%} of all "
                     f"{report.parameters:,} parameters"),
        ("written", f"{human_size(report.bytes_written)} in {len(report.files)} file(s), {report.seconds:.2f} s"),
    ]
    out.print(kv_table(rows))
    if report.tensors:
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        for col, justify in (("tensor", "left"), ("shape", "right"), ("zeros", "right"), ("pattern", "left")):
            table.add_column(col, justify=justify, overflow="fold" if col == "tensor" else None)
        for t in report.tensors[:_SHOWN]:
            table.add_row(escape(t.name), "x".join(map(str, t.shape)), f"{t.sparsity:.2%}",
                          "ok" if t.pattern_ok else "[red]not met[/]")
        out.print(table)
    if len(report.tensors) > _SHOWN:
        out.print(f"  ... and {len(report.tensors) - _SHOWN} more (see --json)")
    for s in report.skipped:
        out.print(f"  skipped {escape(s['name'])}: {escape(s['reason'])}")
    for note in report.notes:
        out.print(f"  note: {escape(note)}")
    if report.verification is None:
        out.print("  [yellow]not verified[/] (--no-verify)")
        return
    out.print(f"[green]checked[/]: {escape(report.verification.summary())}")
    q = report.quality
    if q is not None:
        from llmconv.cli.verify_cmd import render_report

        render_report(q)
        limits = ", ".join(f"{k}={v}" for k, v in report.thresholds.items() if v is not None)
        out.print(f"[green]quality[/] ({limits}): {escape(q.summary())}")
