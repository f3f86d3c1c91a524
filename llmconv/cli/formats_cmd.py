"""llmconv formats"""

from __future__ import annotations

from rich.table import Table

from llmconv.cli import options as o
from llmconv.cli.output import out, print_json

HELP = "Show the matrix of supported conversions and transforms."
EPILOG = "Example: [bold]llmconv formats --json[/]"


def command(json_output: o.Json = False) -> None:
    from llmconv.capabilities import matrix

    m = matrix()
    if json_output:
        print_json(m)
        return
    t = Table(title="conversions (source -> destination)", title_justify="left")
    t.add_column("from \\ to")
    dests = m["formats"]
    for d in dests:
        t.add_column(d)
    for s in dests:
        t.add_row(s, *("yes" if d in m["conversions"].get(s, []) else "-" for d in dests))
    out.print(t)
    for f in m["format_details"]:
        out.print(f"  [bold]{f['name']}[/]: {f['description']}")
    out.print("[bold]transforms[/]")
    for name, info in m["transforms"].items():
        out.print(f"  {name}: {info}")
