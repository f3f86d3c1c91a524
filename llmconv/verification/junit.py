"""JUnit XML for CI dashboards: one <testcase> per check, figures in the failure message; a run that ends
without a report (exit 2 or 3) is one <error> case."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmconv.errors import DestinationError, LlmconvError
from llmconv.io import atomic_output, find_input, input_files
from llmconv.verification.report import VerifyReport


def _figures(figs: dict) -> str:
    return ", ".join(f"{k}={_compact(k, v)}" for k, v in figs.items())


def _compact(key: str, value: object) -> object:
    """Lists of per-prompt and per-step figures, one short item each."""
    if key == "per_prompt" and isinstance(value, list):
        return "[" + "; ".join(f"prompt {r.get('prompt')}: " + ("identical" if r.get("first_divergence") is None
                                                                else f"parts at token {r['first_divergence']}"
                                                                + (" (tie)" if r.get("tie") else ""))
                               + f", agreement {r.get('agreement'):.3f}" for r in value) + "]"
    if key == "steps" and isinstance(value, list):
        return "[" + "; ".join(f"step {r.get('step')}: max_abs {r.get('max_abs'):.3g}, top1 {r.get('top1_agreement')}"
                               + ("" if r.get("passed") else " FAIL") for r in value) + "]"
    return value


def check_report_path(path: str | Path, *, models: list[str | Path | None],
                      reads: dict[str, str | Path | None] | None = None,
                      writes: list[str | Path] | None = None) -> Path:
    """Refuse a report path that would replace a folder, any file that the compared models read, another
    file the command reads, or that lies in the command's destination.

    Args:
        path: the ``--junit`` path.
        models: the compared models (their files: shards, index, config, external data); None entries are skipped.
        reads: the other files the command reads, by flag (``{"--text": path}``); None entries are skipped.
        writes: the command's destinations (DST): the report may be neither one nor inside one.
    Returns:
        The path.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise DestinationError("--junit names a folder; it takes the path of an XML file", path=path,
                               hint="e.g. --junit reports/verify.xml")
    inputs = [f for model in models if model is not None for f in input_files(Path(model))]
    clash = find_input([path], inputs)
    if clash is not None:
        _, how, hit = clash
        raise DestinationError(f"--junit names one of the models being compared: it {how} {hit}; the report "
                               "would replace it", path=path, hint="give the report a path of its own")
    for flag, given in (reads or {}).items():
        clash = find_input([path], input_files(Path(given))) if given is not None else None
        if clash is not None:
            _, how, hit = clash
            raise DestinationError(f"--junit names the file that {flag} reads: it {how} {hit}; the report would "
                                   "replace it", path=path, hint="give the report a path of its own")
    for dst in writes or []:
        if _within(path, Path(dst)):
            raise DestinationError(f"--junit names the destination {dst} or a path inside it; the output would "
                                   "replace the report, or the report land in the output", path=path,
                                   hint="give the report a path outside DST")
    return path


def _within(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` or lies inside it, once both are resolved (neither need exist)."""
    try:
        p, o = path.resolve(), other.resolve()
    except (RuntimeError, ValueError, OSError):
        return True  # a link loop, a NUL byte: nothing is written through such a path
    return p == o or o in p.parents


@dataclass
class Step:
    """The command's own step (quantize, prune, convert) as a test case beside the verification checks.

    Attributes:
        name: the command (``quantize``).
        passed: whether the step succeeded (False when its output failed verification).
        seconds: its wall time, verification included.
        message: what it did (system-out) or why it failed (the failure message).
    """

    name: str
    passed: bool
    seconds: float
    message: str = ""


def write_junit_error(path: str | Path, *, code: int, message: str, command: str = "verify", seconds: float = 0.0,
                      properties: dict[str, object] | None = None) -> None:
    """A one-case suite in <error> state, for a run that ended without a report (exit 2 or 3, an interrupt).

    Without it a CI dashboard would keep showing the report of an earlier, passing run.
    """
    suite = ET.Element("testsuite", name=f"llmconv.{command}", tests="1", failures="0", errors="1",
                       time=f"{seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    for k, v in (properties or {}).items():
        ET.SubElement(props, "property", name=k, value=str(v))
    tc = ET.SubElement(suite, "testcase", classname=f"llmconv.{command}", name=command, time=f"{seconds:.3f}")
    ET.SubElement(tc, "error", message=message, type=f"exit {code}").text = message
    _write(suite, Path(path))


def write_junit(report: VerifyReport | None, path: str | Path, *, seconds: float = 0.0, command: str = "verify",
                step: Step | None = None, more: Sequence[VerifyReport | None] = (),
                properties: dict[str, object] | None = None) -> None:
    """Write a run as a JUnit test suite to ``path`` (atomically, replacing it): the command's step, if given,
    then one test case per check of ``report`` and of ``more`` (prune's quality report), each missing or
    unexpected tensor a failing case.

    Args:
        report: the verification (None when the command did not verify).
        path: the XML file.
        seconds: the run's wall time (the suite's ``time``).
        command: ``verify``, ``convert``, ``quantize`` or ``prune``: names the suite and the test classes.
        step: the command's own step, for the commands that write a model.
        more: other verification reports of the run.
        properties: more ``<property>`` entries (source, destination).
    """
    reports = [r for r in (report, *more) if r is not None]
    suite = ET.Element("testsuite", name=f"llmconv.verify.{report.mode}" if command == "verify" and report
                       else f"llmconv.{command}", time=f"{seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    first = reports[0] if reports else None
    shown = dict(properties or {})
    if first is not None:
        shown.update(reference=first.reference, candidate=first.candidate, profile=first.profile)
    for k, v in shown.items():
        ET.SubElement(props, "property", name=k, value=str(v))
    for r in reports:
        loc = r.extra.get("localization")
        if isinstance(loc, dict) and loc.get("summary"):
            ET.SubElement(props, "property", name="localization", value=str(loc["summary"]))
    tests = failures = 0
    if step is not None:
        tc = ET.SubElement(suite, "testcase", classname=f"llmconv.{command}", name=step.name,
                           time=f"{step.seconds:.3f}")
        if step.passed:
            ET.SubElement(tc, "system-out").text = step.message
        else:
            ET.SubElement(tc, "failure", message=step.message).text = step.message
        tests, failures = 1, int(not step.passed)
    for r in reports:
        classname = f"llmconv.{command}.{r.mode}"
        for c in r.checks:
            # Verification does not time each check apart (the runs are shared by several): 0, as JUnit allows.
            tc = ET.SubElement(suite, "testcase", classname=classname, name=c.name, time="0.000")
            text = _figures(c.figures)
            if not c.passed:
                fail = ET.SubElement(tc, "failure", message=f"{c.reason}: {text}" if c.reason else text)
                fail.text = text
            else:
                ET.SubElement(tc, "system-out").text = text
        for names, why in ((r.missing, "missing in candidate"),
                           (r.unexpected, "unexpected in candidate (not in reference)")):
            for name in names:
                tc = ET.SubElement(suite, "testcase", classname=classname, name=name, time="0.000")
                ET.SubElement(tc, "failure", message=why)
        tests += len(r.checks) + len(r.missing) + len(r.unexpected)
        failures += len(r.failures()) + len(r.missing) + len(r.unexpected)
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    _write(suite, Path(path))


def write_command_junit(path: str | Path, *, command: str, result: Any, seconds: float, summary: str = "",
                        error: str | None = None, verification: VerifyReport | None = None) -> None:
    """The JUnit record of convert, quantize or prune: a test case for the command's own step (failed, with
    ``error``, when its output failed verification), then one per check of its verification and quality reports.

    Args:
        path: the XML file.
        command: the command's name.
        result: its report (ConvertReport, QuantizeReport, PruneReport; on exit 1 the partial one that
            ``NotEquivalent.result`` carries), or None when there is none.
        seconds: the run's wall time.
        summary: one line on what the step did (the passing case's output).
        error: the error's message when the run failed verification.
        verification: the failed verification when ``result`` is None (``NotEquivalent.report``).
    """
    if result is not None:
        verification = getattr(result, "verification", None)
    step = Step(command, error is None, seconds, error or summary)
    props = {"source": getattr(result, "source", None), "destination": getattr(result, "destination", None)}
    write_junit(verification, path, seconds=seconds, command=command, step=step,
                more=[getattr(result, "quality", None)], properties={k: v for k, v in props.items() if v})


def junit_argument(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The value of ``--junit`` in a command line (the last one, as the parser takes it), or None; and every other
    value on it (arguments, option values) that may name a path."""
    found, others = None, []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--junit":
            if i + 1 < len(argv):
                found, skip = argv[i + 1], True
        elif arg.startswith("--junit="):
            found = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            if "=" in arg:
                others.append(arg.split("=", 1)[1])
        else:
            others.append(arg)
    return found or None, [v for v in others if v]


def write_run_error(argv: Sequence[str], *, command: str, code: int, message: str, seconds: float) -> bool:
    """Record a run that ended without a report (usage error, bad input, a bug, an interrupt) in the ``--junit``
    file its command line names, so that a dashboard never shows an earlier run's verdict for this one.

    Written only where the report may go: not a folder, not a file of anything else the command line names
    (a model, ``--text``, ...) nor a path inside one of them (DST); a path that cannot be written is left alone.

    Returns:
        Whether the file was written.
    """
    given, named = junit_argument(argv)
    if given is None:
        return False
    path = Path(given)
    try:
        if any(_within(path, Path(v)) for v in named):
            return False
        check_report_path(path, models=[Path(v) for v in named if Path(v).exists()])
        write_junit_error(path, code=code, message=message, command=command, seconds=seconds,
                          properties={"command": " ".join(["llmconv", *argv])})
    except (LlmconvError, OSError, ValueError):
        return False
    return True


# Characters XML 1.0 forbids even as references: ElementTree writes them raw, and every XML reader then refuses
# the whole report. Tensor names and paths may hold them (an ESC sequence in a crafted checkpoint).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_safe(text: str) -> str:
    """``text`` with the characters XML cannot hold written as escapes (``\\x1b``), as the terminal shows them."""
    return _NOT_XML.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _clean(element: ET.Element) -> None:
    for el in element.iter():
        for key, value in el.attrib.items():
            el.set(key, _xml_safe(value))
        if el.text:
            el.text = _xml_safe(el.text)


def _write(suite: ET.Element, path: Path) -> None:
    _clean(suite)
    tree = ET.ElementTree(ET.Element("testsuites"))
    tree.getroot().append(suite)
    ET.indent(tree)
    with atomic_output(path, folder=False, force=True) as tmp:
        tree.write(tmp, encoding="utf-8", xml_declaration=True)
