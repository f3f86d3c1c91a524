"""llmconv convert SRC DST"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from llmconv.cli import options as o
from llmconv.cli.output import escape, out, print_json, run_recorded

HELP = "Convert a checkpoint between formats (lossless by default), verified before it is put in place."
EPILOG = ("Examples: [bold]llmconv convert model/pytorch_model.bin model.safetensors[/]  ·  "
          "[bold]llmconv convert hf-folder out-folder --to safetensors --shard-size 2GB --dtype bf16[/]  ·  "
          "[bold]llmconv convert hf-folder model.onnx[/]")
# The JSON object's keys besides schema, ok and error, on every exit (llmconv.convert/1).
JSON_FIELDS = ("source", "destination", "source_format", "destination_format", "weights_format", "tensors",
               "parameters", "bytes_written", "files", "dtype", "cast", "aliases", "dropped_aliases", "notes",
               "seconds", "verified", "verification", "task", "opset", "ir_version", "exporter", "external_data",
               "graphs")


def command(
    src: o.Src,
    dst: o.Dst,
    to: Annotated[str | None, typer.Option(
        "--to", help="Destination format: safetensors|pytorch|hf|onnx (default: from DST's extension, "
                     "or the source's kind).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="keep|fp32|fp16|bf16 for floating-point tensors.")] = "keep",
    shard_size: Annotated[str | None, typer.Option("--shard-size", help="Largest shard, e.g. 2GB or 500MB "
                                                                        "(folder destinations).")] = None,
    task: Annotated[str | None, typer.Option(
        "--task", help="ONNX export task, as optimum names them (text-generation-with-past, "
                       "feature-extraction, ...).")] = None,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset for export.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="config.json for a bare weights file "
                                                                 "(ONNX export needs the architecture).")] = None,
    external_data: Annotated[bool, typer.Option("--external-data", help="ONNX: always store weights in an "
                                                                         "external data file.")] = False,
    decode_steps: o.DecodeSteps = None,
    generate: o.Generate = None,
    verify: o.Verify = True,
    force: o.Force = False,
    quiet: o.Quiet = False,
    json_output: o.Json = False,
    junit: o.Junit = None,
    keep_failed: o.KeepFailed = None,
) -> None:
    from llmconv.conversion import convert
    from llmconv.io import human_size

    t0 = time.perf_counter()
    if junit is not None:
        from llmconv.verification.junit import check_report_path

        check_report_path(junit, models=[src], writes=[dst], reads={"--config": config})

    export_options = {k: v for k, v in (("task", task), ("opset", opset), ("config", config)) if v}
    if external_data:
        export_options["external_data"] = True
    for key, value in (("decode_steps", decode_steps), ("generate", generate)):
        if value is not None:
            export_options[key] = value
    # The bytes written and the export's steps reach the terminal through llmconv.progress (see guarded()).
    report = run_recorded(
        "convert", lambda: convert(src, dst, to=to, dtype=dtype, shard_size=shard_size, verify=verify, force=force,
                                   **export_options),
        junit=junit, keep=keep_failed, t0=t0,
        summary=lambda r: f"{r.source_format} -> {r.destination_format}: {r.tensors} tensors, "
                          f"{human_size(r.bytes_written)} in {len(r.files)} file(s)")
    if json_output:
        print_json(report.to_json())
        return
    if quiet:
        return
    target = report.destination_format + (f" folder, {report.weights_format} weights" if report.weights_format and
                                          report.destination_format in ("hf", "peft") else "")
    out.print(f"[green]converted[/] {escape(report.source)} ({report.source_format}) -> "
              f"{escape(report.destination)} ({target})")
    tied = f" (+{len(report.aliases)} tied)" if report.aliases else ""
    out.print(f"  {report.tensors} tensors{tied}, {report.parameters:,} parameters, {human_size(report.bytes_written)} "
              f"in {len(report.files)} file(s), {report.seconds:.2f} s")
    if report.cast:
        out.print(f"  cast {len(report.cast)} floating-point tensors to {report.dtype}")
    for alias, canon in report.dropped_aliases.items():
        out.print(f"  tied: {escape(alias)} is stored once, as {escape(canon)} (as transformers saves it)")
    for note in report.notes:
        out.print(f"  note: {escape(note)}")
    v = report.verification
    if v is not None:
        against = ", against the cast values" if report.cast and v.mode == "weights" else ""
        out.print(f"  [green]verified[/]: {escape(v.summary())} ({v.mode}, {v.profile}{against})")
    else:
        out.print("  [yellow]not verified[/] (--no-verify)")
