"""llmconv formats"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from llmconv.cli import options as o
from llmconv.cli.output import out, print_json, run_seconds

HELP = "Show the matrix of supported conversions and transforms (--models: the architectures tested)."
EPILOG = "Example: [bold]llmconv formats --json[/], [bold]llmconv formats --models[/]"

# The keys of `formats --json` on every exit (`--models` prints its own object, llmconv.models/1).
JSON_FIELDS = ("formats", "format_details", "conversions", "conversion_conditions", "transforms", "seconds")
Models = Annotated[bool, typer.Option("--models", help="List the architecture x task pairs the test suite exports "
                                                         "to ONNX and verifies, and those it shows refused.")]


def command(json_output: o.Json = False, models: Models = False) -> None:
    if models:
        _models(json_output)
        return
    from llmconv.capabilities import matrix

    m = matrix()
    if json_output:
        print_json({**m, "seconds": round(run_seconds(), 3)})
        return
    t = Table(title="conversions (source -> destination)", title_justify="left")
    t.add_column("from \\ to")
    dests = m["formats"]
    for d in dests:
        t.add_column(d)
    conditions = m["conversion_conditions"]
    for s in dests:
        t.add_row(s, *(("yes*" if d in conditions.get(s, {}) else "yes") if d in m["conversions"].get(s, []) else "-"
                       for d in dests))
    out.print(t)
    for s, by_dest in conditions.items():
        for d, condition in by_dest.items():
            out.print(f"  * {s} -> {d}: {condition}")
    for f in m["format_details"]:
        out.print(f"  [bold]{f['name']}[/]: {f['description']}")
    out.print("[bold]transforms[/]")
    for name, info in m["transforms"].items():
        out.print(f"  {name}: {info}")


def _models(json_output: bool) -> None:
    from llmconv.coverage import CHECKS, MODELS, REFUSED, models_json

    if json_output:
        print_json({**models_json(), "seconds": round(run_seconds(), 3)})
        return
    t = Table(title="exported to ONNX and verified against PyTorch by the test suite", title_justify="left")
    for col in ("family", "model_type", "architecture", "task", "exporter"):
        t.add_column(col)
    for m in MODELS:
        t.add_row(m.family, m.model_type, m.architecture, m.task, m.exporter)
    out.print(t)
    for family, checks in CHECKS.items():
        out.print(f"  [bold]{family}[/]: {checks}")
    out.print("[bold]refused[/] (the export fails, says why, and writes nothing)")
    for m, why in REFUSED:
        out.print(f"  {m.model_type} ({m.architecture}): {why}")
