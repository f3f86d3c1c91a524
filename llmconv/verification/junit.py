"""JUnit XML for CI dashboards: one <testcase> per check, figures in the failure message."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from llmconv.errors import DestinationError
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
                      reads: dict[str, str | Path | None] | None = None) -> Path:
    """Refuse a report path that would replace a folder, any file that the compared models read, or another
    file the command reads.

    Args:
        path: the ``--junit`` path.
        models: the compared models (their files: shards, index, config, external data); None entries are skipped.
        reads: the other files the command reads, by flag (``{"--text": path}``); None entries are skipped.
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
    return path


def write_junit_error(path: str | Path, *, code: int, message: str, reference: str, candidate: str,
                      seconds: float = 0.0) -> None:
    """A one-case suite in <error> state, for a verification that could not run (bad input, exit 2).

    Without it a CI dashboard would keep showing the report of an earlier, passing run.
    """
    suite = ET.Element("testsuite", name="llmconv.verify", tests="1", failures="0", errors="1",
                       time=f"{seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    for k, v in (("reference", reference), ("candidate", candidate)):
        ET.SubElement(props, "property", name=k, value=str(v))
    tc = ET.SubElement(suite, "testcase", classname="llmconv.verify", name="verify")
    ET.SubElement(tc, "error", message=message, type=f"exit {code}").text = message
    _write(suite, Path(path))


def write_junit(report: VerifyReport, path: Path, *, seconds: float = 0.0) -> None:
    """Write ``report`` as a JUnit test suite to ``path`` (atomically, replacing it)."""
    cases = list(report.checks)
    failures = sum(1 for c in cases if not c.passed) + len(report.missing) + len(report.unexpected)
    suite = ET.Element("testsuite", name=f"llmconv.verify.{report.mode}",
                       tests=str(len(cases) + len(report.missing) + len(report.unexpected)),
                       failures=str(failures), errors="0", time=f"{seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    for k, v in (("reference", report.reference), ("candidate", report.candidate), ("profile", report.profile)):
        ET.SubElement(props, "property", name=k, value=str(v))
    loc = report.extra.get("localization")
    if isinstance(loc, dict) and loc.get("summary"):
        ET.SubElement(props, "property", name="localization", value=str(loc["summary"]))
    classname = f"llmconv.verify.{report.mode}"
    for c in cases:
        tc = ET.SubElement(suite, "testcase", classname=classname, name=c.name)
        text = _figures(c.figures)
        if not c.passed:
            fail = ET.SubElement(tc, "failure", message=f"{c.reason}: {text}" if c.reason else text)
            fail.text = text
        else:
            ET.SubElement(tc, "system-out").text = text
    for name in report.missing:
        tc = ET.SubElement(suite, "testcase", classname=classname, name=name)
        ET.SubElement(tc, "failure", message="missing in candidate")
    for name in report.unexpected:
        tc = ET.SubElement(suite, "testcase", classname=classname, name=name)
        ET.SubElement(tc, "failure", message="unexpected in candidate (not in reference)")
    _write(suite, Path(path))


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
