#!/usr/bin/env bash
# The GPU checks of issue 19 as one script: the device-dependent tests on every device, then the
# benchmarks' GPU rows (--device cuda; each writes results/<name>_cuda.json, --quick: results/quick/).
# Usage: benchmarks/gpu.sh [--quick]   (from the repository root, .venv installed)
# Each step has its own time limit, so one slow step leaves the others their figures.
set -u
PY=${PY:-.venv/bin/python}
QUICK=${1:-}
export PYTHONPATH=$PWD
status=0
step() {  # step SECONDS COMMAND...: run with a limit, keep going, remember a failure
    local limit=$1; shift
    echo "== $*"
    timeout "$limit" "$@" || { echo "!! failed (rc $?): $*"; status=1; }
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 2
step 300 "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_devices.py --device all
step 600 "$PY" benchmarks/photonic.py --device cuda $QUICK
step 600 "$PY" benchmarks/moment_propagation.py --device cuda --no-tvm $QUICK
step 900 "$PY" benchmarks/uncertainty.py --device cuda $QUICK
step 900 "$PY" benchmarks/analog.py --device cuda $QUICK
exit $status
