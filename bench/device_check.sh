#!/usr/bin/env bash
# The one short GPU check a session with a CUDA machine runs (a few minutes on an H200),
# from the repository root:
#   the demo on cuda, without and with mixed precision (--amp: float16 + GradScaler),
#   the latency calibration on CUDA (--runtime torch --device cuda, with its check),
#   the GPU tests (tests/test_cuda.py, skipped where there is no GPU).
# The logs, the CUDA profile and a summary (seven files) go to $OUT (the device tool's
# folder that comes back, at most eight files), else /tmp/device-check; the demos' own output
# folders stay in /tmp. The machine needs torch, torchvision, onnx, onnxruntime, onnxscript,
# pluggy, pyyaml, scikit-learn, pytest and pytest-xdist (pyproject's addopts use it) already
# installed: nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/device-check}"
work=/tmp/device-check-runs
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1
python=${PYTHON:-python3}
status=0

step() {  # name, command...: run it, keep its log, remember a failure
    local name=$1
    shift
    echo "== $name: $*"
    local started=$SECONDS
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - started)) s"
    tail -n 25 "$out/$name.log"
    [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$python" -m pip install -q --no-deps --no-build-isolation -e . >"$work/install.log" 2>&1 || {
    echo "install failed"; tail "$work/install.log"; exit 1; }
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step demo-cuda "$python" -m dnnshrink_core demo --out "$work/demo" --device cuda --quiet --force
step demo-cuda-amp "$python" -m dnnshrink_core demo --out "$work/demo-amp" --device cuda --amp --quiet --force
step calibrate-cuda "$python" -m dnnshrink_core calibrate --runtime torch --device cuda --out "$out/cuda-profile.json"
step gpu-tests "$python" -m pytest -q -n 0 -p no:cacheprovider tests/test_cuda.py
# the figures for docs/benchmarks.md
"$python" bench/device_summary.py "$work/demo/report.json" "$work/demo-amp/report.json" | tee "$out/summary.txt"
exit $status
