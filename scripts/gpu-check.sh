#!/usr/bin/env bash
# make gpu-check: the GPU path verified on this host in one command (README, "Checking a GPU
# host"). Uses the host's CUDA PyTorch, installs only what is missing into .venv-gpu (a venv that
# sees the host's packages; GPU_WHEELS=DIR installs from DIR only), then runs the checks
# (services/tools/gpu_check.py): one table, JSON at GPU_CHECK_OUT (gpu-check.json).
# Exit: 0 passed, 1 a check failed, 77 no CUDA device (said within seconds).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
no_device() {
  echo "gpu-check: no CUDA device ($1)"
  exit 77
}
# Asked of the host's own Python, which must hold the CUDA PyTorch to test.
timeout 120 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null
case $? in
  0) ;;
  3) no_device "torch.cuda.is_available() is False in $PY" ;;
  124) no_device "$PY did not answer within 120 s" ;;
  *) no_device "no PyTorch in $PY" ;;
esac
VENV=.venv-gpu
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV" || exit 1
fi
"$VENV/bin/python" scripts/gpu_check_install.py || exit 1
exec timeout 600 "$VENV/bin/python" -m services.tools.gpu_check
