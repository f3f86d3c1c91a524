"""Summary table of a batch conversion: one row per model from OUT_DIR/.status/*.json(.failed).

Usage: batch_summary.py STATUS_DIR [MODELS_DIR]. With MODELS_DIR, models no longer in it are not listed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main(argv: list[str]) -> int:
    status = Path(argv[1]) if len(argv) > 1 else Path("converted/.status")
    models = Path(argv[2]) if len(argv) > 2 else None
    # One report per model, the latest when a run left both kinds; none for models since removed.
    latest: dict[str, Path] = {}
    for path in list(status.glob("*.json")) + list(status.glob("*.json.failed")):
        name = path.name.removesuffix(".failed").removesuffix(".json")
        if models is not None and not (models / name).exists() and not (models / name).is_symlink():
            continue
        if name not in latest or path.stat().st_mtime > latest[name].stat().st_mtime:
            latest[name] = path
    rows = []
    for name, path in sorted(latest.items()):
        try:
            report = json.loads(path.read_text() or "{}")
        except json.JSONDecodeError:
            report = {}
        if report.get("ok"):
            v = report.get("verification") or {}
            verified = ("yes" if v.get("ok") else "FAILED") if report.get("verified") else "skipped"
            rows.append((name, "[green]ok[/]", Path(report.get("destination", "")).name, str(report.get("tensors", "")),
                         f"{report.get('bytes_written', 0) / 1e6:.1f} MB", verified,
                         f"{report.get('seconds', 0):.2f}", ""))
        else:
            err = (report.get("error") or {}).get("message", "no report (crashed?)")
            err = err if len(err) <= 160 else err[:157] + "..."
            rows.append((name, "[red]FAILED[/]", "", "", "", "", "", err))
    table = Table(title=f"batch conversion: {status.parent}", title_justify="left")
    for col in ("model", "status", "output", "tensors", "size", "verified", "seconds", "error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*r)
    console = Console(width=max(Console().width, 140))
    console.print(table)
    failed = sum(1 for r in rows if "FAILED" in r[1])
    console.print(f"{len(rows) - failed} converted, {failed} failed")
    return 0  # the batch target's exit status already says whether a model failed


if __name__ == "__main__":
    sys.exit(main(sys.argv))
