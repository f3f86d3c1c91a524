"""llmconv convert SRC DST"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmconv.cli import options as o
from llmconv.cli.output import byte_progress, err, escape, out, print_json

HELP = "Convert a checkpoint between formats (lossless by default), verified before it is put in place."
EPILOG = ("Examples: [bold]llmconv convert model/pytorch_model.bin model.safetensors[/]  ·  "
          "[bold]llmconv convert hf-folder out-folder --to safetensors --shard-size 2GB --dtype bf16[/]  ·  "
          "[bold]llmconv convert hf-folder model.onnx[/]")


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
) -> None:
    from llmconv.conversion import convert
    from llmconv.formats import registry
    from llmconv.io import human_size

    export_options = {k: v for k, v in (("task", task), ("opset", opset), ("config", config)) if v}
    if external_data:
        export_options["external_data"] = True
    for key, value in (("decode_steps", decode_steps), ("generate", generate)):
        if value is not None:
            export_options[key] = value
    total = 0
    if not (quiet or json_output) and err.is_terminal:
        with registry.open_checkpoint(src) as s:
            total = s.total_bytes
    with byte_progress(total, f"writing {dst.name}", enabled=not (quiet or json_output)) as advance:
        report = convert(src, dst, to=to, dtype=dtype, shard_size=shard_size, verify=verify, force=force,
                         progress=advance, **export_options)
    if json_output:
        print_json(report.to_json())
        return
    if quiet:
        return
    target = report.destination_format + (f" folder, {report.weights_format} weights" if report.weights_format and
                                          report.destination_format == "hf" else "")
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
