#!/usr/bin/env bash
# lrponnx GPU benchmark, for a GPU machine with PyTorch (CUDA) and a CPU-only onnxruntime, offline.
#
#   bash bench/gpu/run_gpu.sh            # from anywhere; results in $OUT (default bench/_work/gpu_out)
#
# Needs in the working tree (git-ignored, carried by whoever runs it):
#   bench/_gpu_wheel/part.*          the onnxruntime-gpu wheel split in parts (joined in name order);
#                                    it must match this machine's Python (cp312 wheel for Python 3.12)
#   bench/_gpu_wheel/wheel.sha256    optional: sha256 of the joined wheel
#   bench/_gpu_wheel/extra/          zennit-0.5.1-py3-none-any.whl (if zennit is missing here) and the two
#                                    deploy prototxts (bvlc_reference_caffenet.prototxt, bvlc_googlenet.prototxt)
# Steps (each may fail alone; what failed is printed and written to $OUT):
#   1. bench/gpu/gpu_setup.py: join + check + install the wheel into /tmp/lrponnx_gpu/site (pip --no-index
#      --no-deps --target, else unzip), install missing pure-Python wheels, find the CUDA/cuDNN libraries of
#      the installed torch (site-packages/nvidia/*/lib) for LD_LIBRARY_PATH.
#   2. bench/gpu/gpu_bench.py: build CaffeNet and GoogLeNet (random weights, seed 0) with the Caffe
#      converter, convert the explainers, time ORT CUDA forward / explainer and Zennit CUDA at batch 32.
# Whole script: under 5 minutes (setup hard limit 60 s; the benchmark starts no new part after 170 s and is
# killed at 225 s, keeping what it wrote). Extra arguments go to gpu_bench.py (e.g. --batch 8, --allow-cpu).
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/bench/_work/gpu_out}"
WORK="${LRPONNX_GPU_WORK:-/tmp/lrponnx_gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
LOG="$OUT/gpu_log.txt"
exec > >(tee -a "$LOG") 2>&1

echo "== $(date -Is) lrponnx GPU benchmark in $ROOT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
"$PY" -c 'import sys; print("python", sys.version.split()[0], sys.executable)' || echo "no $PY"
nproc 2>/dev/null | sed 's/^/cpus: /'

echo "== setup"
timeout 60 "$PY" "$HERE/gpu_setup.py" --work "$WORK" --out "$OUT" || echo "gpu_setup.py failed (rc $?)"
if [ -f "$WORK/env.sh" ]; then
  # shellcheck disable=SC1091
  . "$WORK/env.sh"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "PYTHONPATH=$PYTHONPATH"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
"$PY" - <<'EOF' || echo "onnxruntime check failed"
import torch  # load CUDA libraries first
import onnxruntime as ort
print("onnxruntime", ort.__version__, "from", ort.__file__)
print("providers", ort.get_available_providers())
EOF

echo "== benchmark"
timeout 225 "$PY" "$HERE/gpu_bench.py" --work "$WORK" --out "$OUT" --deadline-s 170 "$@" || echo "gpu_bench.py stopped (rc $?)"
echo "== results"
cat "$OUT/gpu_results.md" 2>/dev/null || echo "no results written"
ls -la "$OUT"
exit 0
