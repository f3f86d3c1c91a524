"""CPU-aware int8 and the accuracy-driven fallback of ``quantize --method auto``.

What these tests assert holds on any CPU: the CPU classification is a pure function of CPUID and
/proc/cpuinfo (tested on the flags of real CPUs), the settings follow from ``--cpu`` (not from this
machine) when it is given, and the fallback is driven by a graph whose int8 failure is in the method
(an activation outlier that per-tensor dynamic quantization cannot represent), not in a kernel.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import llmconv
from llmconv.errors import NotEquivalent, UsageError
from llmconv.transforms.cpu import (
    CPU_CHOICES,
    Int8Setting,
    classify,
    detect_cpu,
    fallback_chain,
    int8_rule,
    settings_cpu,
)
from tests.transforms._models import leftovers

# /proc/cpuinfo flags (the int8-relevant part) of real CPUs, and what numpy's CPUID table says on them.
ZEN2 = {"sse4_2", "avx", "avx2", "fma", "bmi2"}  # AMD EPYC 7002: AVX2, no AVX-512, no VNNI
SKYLAKE_SP = ZEN2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}  # AVX-512 without VNNI
CASCADE_LAKE = SKYLAKE_SP | {"avx512_vnni"}
ALDER_LAKE = ZEN2 | {"avx_vnni"}  # AVX-VNNI (VEX), no AVX-512
SAPPHIRE_RAPIDS = CASCADE_LAKE | {"avx_vnni", "amx_int8", "amx_tile", "amx_bf16"}


def _numpy_view(flags: set[str]) -> dict[str, bool]:
    return {"AVX2": "avx2" in flags, "AVX512F": "avx512f" in flags, "AVX512BW": "avx512bw" in flags,
            "AVX512VNNI": "avx512_vnni" in flags}


@pytest.mark.parametrize(("flags", "isa", "saturates"), [
    (ZEN2, "avx2", True), (SKYLAKE_SP, "avx512", True), (CASCADE_LAKE, "avx512-vnni", False),
    (ALDER_LAKE, "avx-vnni", False), (SAPPHIRE_RAPIDS, "avx512-vnni", False), ({"sse4_2"}, "x86-64", True),
])
def test_classify_real_cpus(flags, isa, saturates):
    info = classify("x86_64", _numpy_view(flags), flags, "some cpu")
    assert info.isa == isa and info.saturates is saturates
    assert int8_rule(info.isa).reduce_range is saturates  # 7-bit weights exactly where U8S8 saturates


def test_classify_believes_cpuid_over_a_passed_through_proc_cpuinfo():
    # An emulator (qemu -cpu max) shows AVX2 through CPUID but passes the host's /proc/cpuinfo through.
    info = classify("x86_64", _numpy_view(ZEN2), SAPPHIRE_RAPIDS, "host cpu")
    assert info.isa == "avx2" and info.saturates and "avx_vnni" not in info.features
    assert classify("x86_64", {}, ZEN2).isa == "avx2"  # no numpy table: /proc/cpuinfo alone
    assert classify("aarch64", {"ASIMD": True, "ASIMDDP": True}, set()).isa == "arm64"
    assert not classify("aarch64", {}, set()).saturates
    assert classify("riscv64", {}, set()).isa == "unknown"


def test_detect_cpu_agrees_with_numpy_cpuid_table():
    from numpy._core._multiarray_umath import __cpu_features__ as feats

    info = detect_cpu()
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert ("avx2" in info.features) is bool(feats["AVX2"])
        assert ("avx512_vnni" in info.features) is bool(feats["AVX512VNNI"])
        assert info.saturates is not (bool(feats["AVX512VNNI"]) or "avx_vnni" in info.features
                                      or "amx_int8" in info.features)


def test_fallback_chain_order_and_forced_per_channel():
    first = int8_rule("avx2")
    chain = fallback_chain(first, per_channel_forced=False)
    assert [(s.weight_type, s.per_channel, s.reduce_range) for s in chain] == [
        ("int8", True, True), ("uint8", True, False)]  # the rule is already per-channel: no repeats
    vnni = fallback_chain(int8_rule("avx512-vnni"), per_channel_forced=False)
    assert [(s.weight_type, s.per_channel, s.reduce_range) for s in vnni] == [
        ("int8", False, False), ("int8", True, False), ("int8", True, True), ("uint8", True, False)]
    forced = fallback_chain(Int8Setting(per_channel=True), per_channel_forced=True)
    assert all(s.per_channel for s in forced) and len(forced) == 3
    with pytest.raises(UsageError, match="unknown --cpu 'avx3'"):
        settings_cpu("avx3", detect_cpu())
    assert set(CPU_CHOICES) == {"auto", "avx2", "avx512", "avx512-vnni", "arm64"}


@pytest.mark.parametrize(("cpu", "reduce_range"), [("avx2", True), ("avx512", True), ("avx512-vnni", False),
                                                     ("arm64", False)])
def test_cpu_option_picks_the_settings_of_that_cpu(onnx_fx, tmp_path, cpu, reduce_range):
    dst = tmp_path / f"{cpu}.onnx"
    try:
        r = llmconv.quantize(onnx_fx("llama-hf"), dst, target="cpu", method="int8-dynamic", cpu=cpu)
    except NotEquivalent as e:  # verified on this CPU: its kernels may saturate where the target's do not
        assert not dst.exists() and e.report.extra["attempts"][0]["reduce_range"] is reduce_range
        return
    assert r.options["reduce_range"] is reduce_range and r.options["weight_type"].startswith("int8")
    assert r.options["cpu"]["settings_for"] == cpu and r.options["cpu"]["chosen_by"] == "--cpu"
    assert r.options["cpu"]["this_cpu"]["isa"] == detect_cpu().isa
    assert len(r.attempts) == 1  # an explicit --method is one setting, never a fallback
    model = onnx.load(str(dst))
    inits = {t.name: t for t in model.graph.initializer}
    weights = [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMulInteger"]
    assert len(weights) == 15 and all(t.data_type == onnx.TensorProto.INT8 for t in weights)
    qmax = max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max()) for t in weights)
    assert (qmax <= 64) is reduce_range  # 7-bit weights lie in [-64, 64]


def test_cpu_option_refused_where_it_does_not_apply(onnx_fx, tmp_path):
    src = onnx_fx("llama-hf")
    with pytest.raises(UsageError, match="--cpu picks the int8 settings of --target cpu"):
        llmconv.quantize(src, tmp_path / "a.onnx", target="gpu", cpu="avx2")
    with pytest.raises(UsageError, match="does not apply to int4"):
        llmconv.quantize(src, tmp_path / "b.onnx", target="cpu", method="int4", cpu="avx2")
    with pytest.raises(UsageError, match="unknown --cpu"):
        llmconv.quantize(src, tmp_path / "c.onnx", target="cpu", cpu="pentium")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def outlier_head(trained_onnx, tmp_path_factory) -> Path:
    """The trained GPT-2 with an activation outlier before its LM head (same float function)."""
    from fixtures.outliers import with_outliers

    return with_outliers(trained_onnx, tmp_path_factory.mktemp("outlier") / "m", ["/lm_head/MatMul"])


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        else:
            feeds[i.name] = np.zeros([ids.shape[0], i.shape[1], 0, i.shape[3]], dtype=np.float32)
    return sess.run(["logits"], feeds)[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


def test_outlier_graph_computes_the_same_function(outlier_head, trained_onnx):
    ids = np.random.default_rng(1).integers(0, 500, size=(2, 12))
    ref, out = _logits(trained_onnx / "model.onnx", ids), _logits(outlier_head, ids)
    assert np.abs(ref - out).max() < 1e-3


def test_fallback_keeps_the_measured_node_in_float(outlier_head, trained_onnx, tmp_path):
    dst = tmp_path / "q.onnx"
    r = llmconv.quantize(outlier_head, dst, target="cpu")
    # Every weight setting fails (the activation, not the weight, is the problem) ...
    tried = [(a.setting.weight_type, a.setting.per_channel, a.setting.reduce_range) for a in r.attempts[:-1]]
    chain = fallback_chain(int8_rule(detect_cpu().isa), per_channel_forced=False)  # 4 with VNNI, 2 without
    assert tried == [(s.weight_type, s.per_channel, s.reduce_range) for s in chain]
    assert all(a.passed is False for a in r.attempts[:-1])
    # ... then the measurement names the LM head, and leaving it in float32 passes.
    measured = [a for a in r.attempts if a.measured][0].measured
    assert measured[0]["node"] == "/lm_head/MatMul" and measured[0]["shortfall"] <= 1.0 < measured[0]["gain"]
    assert all(m["gain"] < 1.0 for m in measured[1:])  # no other node alone comes near the profile
    last = r.attempts[-1]
    assert last.passed and last.setting.exclude == ("/lm_head/MatMul",)
    assert r.options["kept_float"] == ["/lm_head/MatMul"] and r.verification.passed
    assert any("kept in float32" in n for n in r.notes)
    # The written graph: the head computes with its float32 weight, the other layers with int8.
    model = onnx.load(str(dst))
    head = [n for n in model.graph.node if n.op_type == "MatMul" and n.name == "/lm_head/MatMul"]
    assert head and "lm_head" not in " ".join(i for n in model.graph.node if n.op_type == "MatMulInteger"
                                               for i in n.input)
    assert r.ops_quantized.get("Gemm") == 8 and r.ops_quantized.get("MatMul", 0) == 0
    # An independent check of the verdict: onnxruntime on the written file against the float source.
    ids = np.random.default_rng(2).integers(0, 500, size=(2, 16))
    assert _cosine(_logits(trained_onnx / "model.onnx", ids), _logits(dst, ids)) >= 0.99
    js = r.to_json()
    assert js["attempts"][-1]["passed"] is True and len(js["attempts"]) == len(r.attempts)
    assert [a for a in js["attempts"] if "measured_nodes" in a][0]["measured_nodes"][0]["node"] == "/lm_head/MatMul"
    assert js["attempts"][-1]["kept_float"] == ["/lm_head/MatMul"] and not leftovers(tmp_path)


def test_a_node_hidden_by_another_is_found_by_measuring_again(trained_onnx, tmp_path):
    """Two outliers: while the first is quantized the second's own cost does not show; once the first is in
    float32 the measurement is taken again from there and finds the second."""
    from fixtures.outliers import with_outliers

    pair = ["/transformer/h.0/attn/c_attn/Gemm", "/transformer/h.1/mlp/c_fc/Gemm"]
    src = with_outliers(trained_onnx, tmp_path / "two", pair)
    dst = tmp_path / "q.onnx"
    r = llmconv.quantize(src, dst, target="cpu")
    assert r.verification.passed and sorted(r.options["kept_float"]) == sorted(pair)
    measured = [a for a in r.attempts if a.measured]
    assert len(measured) == 2 and measured[0].measured[0]["node"] == pair[0]
    assert measured[1].setting.exclude == (pair[0],) and measured[1].measured[0]["node"] == pair[1]
    assert any(n.startswith("the first setting (") and f"attempt {len(r.attempts)} of" in n for n in r.notes)
    ids = np.random.default_rng(3).integers(0, 500, size=(2, 16))
    assert _cosine(_logits(trained_onnx / "model.onnx", ids), _logits(dst, ids)) >= 0.99


def test_explicit_method_has_no_fallback(outlier_head, tmp_path):
    dst = tmp_path / "q.onnx"
    with pytest.raises(NotEquivalent, match="int8-dynamic output is not within the int8 profile") as e:
        llmconv.quantize(outlier_head, dst, target="cpu", method="int8-dynamic")
    assert len(e.value.report.extra["attempts"]) == 1 and not dst.exists() and not leftovers(tmp_path)


def test_fallback_gives_up_and_writes_nothing(trained_onnx, tmp_path):
    from fixtures.outliers import with_outliers

    names = [n.name for n in onnx.load(str(trained_onnx / "model.onnx")).graph.node
             if n.op_type in ("Gemm", "MatMul") and ("c_" in n.name or "lm_head" in n.name)]
    src = with_outliers(trained_onnx, tmp_path / "all", names)
    dst = tmp_path / "q.onnx"
    with pytest.raises(NotEquivalent, match=r"not within the int8 profile with any of the \d+ settings tried") as e:
        llmconv.quantize(src, dst, target="cpu")
    attempts = e.value.report.extra["attempts"]
    chain = fallback_chain(int8_rule(detect_cpu().isa), per_channel_forced=False)
    assert len(attempts) > len(chain) and not any(a["passed"] for a in attempts)
    assert e.value.report.extra["cpu"]["settings_for"] == detect_cpu().isa
    assert max(len(a["kept_float"]) for a in attempts) <= len(names) // 4 + 1  # never most of the model
    assert not dst.exists() and not leftovers(tmp_path)


def test_trained_gpt2_passes_with_this_cpus_rule(trained_onnx, tmp_path):
    r = llmconv.quantize(trained_onnx, tmp_path / "q.onnx", target="cpu")
    assert r.verification.passed and r.attempts[-1].passed
    assert r.options["reduce_range"] is detect_cpu().saturates
    assert r.options["cpu"]["settings_for"] == detect_cpu().isa


def _qemu() -> str | None:
    return shutil.which("qemu-x86_64") if platform.machine().lower() in ("x86_64", "amd64") else None


@pytest.mark.skipif(_qemu() is None, reason="needs qemu-user (apt-get install qemu-user) on x86-64")
def test_on_an_emulated_avx2_cpu(outlier_head, trained_onnx, tmp_path):
    """Run as on an AVX2-only CPU (qemu's CPU model has AVX2, no AVX-512, no VNNI): the detection says so,
    the rule picks 7-bit weights, and the trained GPT-2's int8 output passes its profile there."""
    dst = tmp_path / "q.onnx"
    # qemu 7.2's AVX2 emulation breaks numpy's AVX2 sort kernels (wrong top-5 figures): numpy's own dispatch
    # is kept below AVX2 there; onnxruntime's kernels, the subject of the test, still run AVX2.
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": "X86_V3"}
    r = subprocess.run([_qemu(), "-cpu", "max", sys.executable, "-m", "llmconv", "quantize", str(trained_onnx),
                        str(dst), "--target", "cpu", "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    js = json.loads(r.stdout)
    assert js["options"]["cpu"]["this_cpu"]["isa"] == "avx2" and js["options"]["cpu"]["this_cpu"]["int8_saturates"]
    assert js["options"]["reduce_range"] is True and js["verification"]["ok"] is True and dst.exists()
