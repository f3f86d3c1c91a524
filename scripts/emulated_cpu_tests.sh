#!/usr/bin/env bash
# Run the test suite as on a CPU with AVX2 and no AVX-512/VNNI (a common cloud or CI machine), whatever this
# machine's CPU is: the Python process runs under qemu-user's `-cpu max` model, so onnxruntime picks the kernels
# that machine would (its U8S8 int8 kernels use VPMADDUBSW and saturate there, and give other figures).
#
#   scripts/emulated_cpu_tests.sh                                   the whole suite (~5-20x slower than native)
#   scripts/emulated_cpu_tests.sh tests/transforms/test_quantize.py -k int8    any pytest arguments
#
# Before the tests, a one-second self-check shows that the emulated CPU really takes the saturating path: a
# MatMulInteger of uint8 255 x int8 127 over K=64 must give less than the exact 2072640. If it does not (a
# qemu whose CPU model has VNNI), the script stops: set QEMU_CPU (e.g. "max,-avx-vnni") and try again.
# Only this process is emulated: a test that starts `python -m llmconv` as a subprocess runs that one natively.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${TEST_PYTHON:-.venv/bin/python}
QEMU=${QEMU:-qemu-x86_64}
QEMU_CPU=${QEMU_CPU:-max}

if [ "$(uname -m)" != "x86_64" ]; then
    echo "error: $(uname -m) host: this emulates an x86-64 CPU for an x86-64 Python; run it on an x86-64 machine" >&2
    exit 2
fi
if ! command -v "$QEMU" >/dev/null 2>&1; then
    echo "error: $QEMU not found: install qemu-user (Debian/Ubuntu: sudo apt-get install qemu-user;" \
         "Fedora: sudo dnf install qemu-user), or set QEMU=/path/to/qemu-x86_64" >&2
    exit 2
fi
if [ ! -x "$PYTHON" ]; then
    echo "error: $PYTHON not found: run 'make install' first (or set TEST_PYTHON=/path/to/python)" >&2
    exit 2
fi

emulated=("$QEMU" -cpu "$QEMU_CPU" "$PYTHON")

# qemu's AVX2 emulation (seen with qemu 7.2) breaks numpy's AVX2 sorting (x86-simd-sort): np.argsort crashes or
# returns a wrong order, and np.argpartition then gives false top-5 figures (0.9375 for an fp16 model that agrees
# on every row). numpy is not what is emulated: its SIMD dispatch above its baseline is turned off in the
# emulated process (onnxruntime and torch still take their AVX2 kernels). Set NPY_DISABLE_CPU_FEATURES to override.
if [ -z "${NPY_DISABLE_CPU_FEATURES+set}" ]; then
    NPY_DISABLE_CPU_FEATURES=$("${emulated[@]}" -c '
try:
    from numpy._core._multiarray_umath import __cpu_dispatch__ as targets, __cpu_features__ as on
except ImportError:  # numpy 1.x
    from numpy.core._multiarray_umath import __cpu_dispatch__ as targets, __cpu_features__ as on
print(" ".join(t for t in targets if on.get(t)))') || {
        echo "error: $PYTHON does not start on qemu's '$QEMU_CPU' CPU model (try QEMU_CPU=max)" >&2; exit 2; }
    export NPY_DISABLE_CPU_FEATURES
fi
echo "numpy SIMD dispatch off in the emulated process: NPY_DISABLE_CPU_FEATURES='$NPY_DISABLE_CPU_FEATURES'"

echo "self-check: int8 MatMulInteger on the emulated CPU ($QEMU -cpu $QEMU_CPU)"
"${emulated[@]}" - <<'EOF'
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K = 64
exact = 255 * 127 * K
graph = helper.make_graph(
    [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "saturation",
    [helper.make_tensor_value_info("A", TensorProto.UINT8, [4, K])],
    [helper.make_tensor_value_info("Y", TensorProto.INT32, [4, 16])],
    [numpy_helper.from_array(np.full((K, 16), 127, np.int8), "B")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
got = int(sess.run(None, {"A": np.full((4, K), 255, np.uint8)})[0][0, 0])
if got < exact:
    print(f"  uint8 255 x int8 127 over K={K}: {got} < exact {exact}: saturated, the AVX2 (no VNNI) int8 path")
    sys.exit(0)
print(f"  uint8 255 x int8 127 over K={K}: {got} == exact {exact}: NOT saturated; this emulated CPU has VNNI "
      "(or is not x86), so the tests would not run the AVX2 path. Set QEMU_CPU (e.g. 'max,-avx-vnni').",
      file=sys.stderr)
sys.exit(1)
EOF

echo "running pytest under $QEMU -cpu $QEMU_CPU (subprocesses the tests start run natively)"
exec "${emulated[@]}" -m pytest -q "$@"
