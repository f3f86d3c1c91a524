"""--junit FILE describes the run that was given it, on every exit: the checks (and the command's own step for
quantize, prune and convert) on exit 0 and 1, one <error> case on a usage error, bad input or a bug; every
test case carries ``time``; and the file never lands on anything the command line names."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import pytest


def suite(path):
    s = ET.parse(path).getroot().find("testsuite")
    cases = s.findall("testcase")
    assert s.get("time") is not None and cases and all(float(c.get("time")) >= 0 for c in cases)
    return s, cases


def test_a_usage_error_replaces_an_earlier_pass_with_one_error_case(cli, fx, tmp_path):
    xml = tmp_path / "reports" / "verify.xml"
    ref, cand = fx("llama-hf"), fx("llama-hf-sharded")
    assert cli("verify", ref, cand, "--junit", xml).exit_code == 0
    s, cases = suite(xml)
    assert s.get("name") == "llmconv.verify.weights" and s.get("failures") == "0" and len(cases) > 1
    for args, said in ((["--seq-len", "0"], "Invalid value for '--seq-len'"),
                       (["--no-such-flag"], "No such option: --no-such-flag")):
        assert cli("verify", ref, cand, "--junit", xml, "--json", *args).exit_code == 2
        s, cases = suite(xml)
        assert (s.get("name"), s.get("tests"), s.get("errors"), s.get("failures")) == ("llmconv.verify", "1", "1", "0")
        error = cases[0].find("error")
        assert error.get("type") == "exit 2" and said in error.get("message")
        assert cli("verify", ref, cand, "--junit", xml).exit_code == 0  # and a pass replaces it again
    # `--junit=FILE` is found too, and an error from the library (exit 2) is recorded the same way.
    r = cli("verify", ref, fx("truncated-data.safetensors"), f"--junit={xml}")
    assert r.exit_code == 2
    s, cases = suite(xml)
    assert s.get("errors") == "1" and "truncated-data.safetensors" in cases[0].find("error").get("message")


def test_quantize_writes_its_step_and_checks_on_exit_0_1_and_2(cli, fx, tmp_path):
    src, xml = fx("llama.safetensors"), tmp_path / "q.xml"
    r = cli("quantize", src, tmp_path / "h.safetensors", "--target", "gpu", "--junit", xml)
    assert r.exit_code == 0, r.stderr
    s, cases = suite(xml)
    assert s.get("name") == "llmconv.quantize" and s.get("failures") == "0"
    assert [c.get("classname") for c in cases[:2]] == ["llmconv.quantize", "llmconv.quantize.weights"]
    assert cases[0].get("name") == "quantize" and "fp16 for gpu" in cases[0].find("system-out").text
    assert int(s.get("tests")) == len(cases) == 1 + 21
    r = cli("quantize", src, tmp_path / "b.safetensors", "--target", "gpu", "--atol", "0", "--rtol", "0",
            "--junit", xml)
    assert r.exit_code == 1
    s, cases = suite(xml)
    step = cases[0].find("failure")
    assert step is not None and "not within the fp16 profile" in step.get("message")
    failed = [c for c in cases[1:] if c.find("failure") is not None]
    assert failed and int(s.get("failures")) == 1 + len(failed)
    r = cli("quantize", src, tmp_path / "h.safetensors", "--target", "gpu", "--junit", xml)  # DST exists: exit 2
    assert r.exit_code == 2
    s, cases = suite(xml)
    assert s.get("name") == "llmconv.quantize" and "destination exists" in cases[0].find("error").get("message")


def test_prune_and_convert_write_junit(cli, fx, tmp_path):
    xml = tmp_path / "p.xml"
    r = cli("prune", fx("llama.safetensors"), tmp_path / "p.safetensors", "--sparsity", "0.5", "--junit", xml)
    assert r.exit_code == 0, r.stderr
    s, cases = suite(xml)
    assert s.get("name") == "llmconv.prune" and cases[0].get("name") == "prune" and s.get("failures") == "0"
    assert any(c.get("name").startswith("pattern ") for c in cases)
    r = cli("convert", fx("llama.safetensors"), tmp_path / "c.bin", "--junit", xml)
    assert r.exit_code == 0, r.stderr
    s, cases = suite(xml)
    assert s.get("name") == "llmconv.convert" and cases[0].get("name") == "convert"
    assert len(cases) == 1 + 21 and {c.get("classname") for c in cases[1:]} == {"llmconv.convert.weights"}
    r = cli("convert", fx("llama.safetensors"), tmp_path / "d.bin", "--no-verify", "--junit", xml)
    assert r.exit_code == 0
    assert [c.get("name") for c in suite(xml)[1]] == ["convert"]  # nothing verified: the step alone


@pytest.mark.parametrize("where", ["dst", "inside-dst", "model"])
def test_junit_never_lands_on_what_the_command_line_names(cli, fx, tmp_path, where):
    model = tmp_path / "llama.safetensors"
    shutil.copy(fx("llama.safetensors"), model)
    dst = tmp_path / "out"
    junit = {"dst": dst, "inside-dst": dst / "report.xml", "model": model}[where]
    r = cli("convert", model, dst, "--to", "safetensors", "--junit", junit)
    assert r.exit_code == 2 and "--junit names" in r.stderr
    assert not dst.exists() and model.read_bytes() == fx("llama.safetensors").read_bytes()
    # A usage error on the same command line leaves them alone too (the report has nowhere safe to go).
    r = cli("convert", model, dst, "--to", "safetensors", "--junit", junit, "--no-such-flag")
    assert r.exit_code == 2
    assert not dst.exists() and model.read_bytes() == fx("llama.safetensors").read_bytes()
