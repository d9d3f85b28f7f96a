#!/usr/bin/env bash
# On the lent GPU machine (device tool; see tests/device/README.md): install the carried wheels
# beside the image's CUDA torch, then run the torch family's tests with KIND_GPU instances: the
# runtime's unit tests (the CUDA ones no longer skip) and the conformance suite through the
# gateway with every torch model on GPU 0. Output goes to $OUT/device-tests.log as well.
set -uo pipefail
cd "$(dirname "$0")/../.."
log="${OUT:-/tmp}/device-tests.log"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
    "cuda", torch.version.cuda, "devices", torch.cuda.device_count())'
  python3 -c 'from gateway.launcher import find_envoy; print("envoy:", find_envoy())'
} 2>&1 | tee "$log"
python3 -c 'import torch; raise SystemExit(0 if torch.cuda.is_available() else 4)' || {
  echo "torch sees no CUDA device here" | tee -a "$log"; exit 4; }
export MESHSERVE_TEST_FAMILIES=torch MESHSERVE_TEST_GPU_FAMILIES=torch
python3 -m pytest -q -p no:cacheprovider -rs \
  tests/unit/test_torch_runtime.py tests/e2e/conformance "$@" 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
