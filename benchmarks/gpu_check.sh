#!/usr/bin/env bash
# The CUDA path on a GPU machine, in one call: a budgeted pretraining of the gpu preset on the
# CIFAR-10 JPEG copy with its evaluation, the CUDA tests, and the step's speed eager and through
# torch.compile (with and without CUDA graphs).
#
#   bash benchmarks/gpu_check.sh CIFAR10_JPG_TARBALL OUT_DIR [BUDGET [DEADLINE_S]]
#
# Runs from the source tree (PYTHONPATH=src) with the machine's own torch. The stages run in
# order of worth (the run, the tests, the speeds), each under its own time limit and all of
# them before DEADLINE_S seconds from the start (default 560), so a lease's limit never cuts the
# log short; a failed stage does not stop the next. Logs and the run's metrics.json and
# config.json go to OUT_DIR. BUDGET (in seconds, default 120s) is the pretraining's --budget;
# RUN_ARGS adds options to that run (e.g. RUN_ARGS="--method vicreg").
set -u
tarball=${1:?the cifar10-jpg.tar.gz file}
out=${2:?a folder for the logs}
budget=${3:-120s}
deadline=$((SECONDS + ${4:-560}))
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of the script itself

stage() {  # stage NAME SECONDS COMMAND...: run it under a limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  if ((left < 10)); then
    echo "== $name: skipped (deadline)"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  tail -n "${TAIL:-8}" "$out/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$py" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'python', platform.python_version(), torch.cuda.get_device_name(0) if torch.cuda.is_available()
else 'no CUDA')"
  nproc
} > "$out/machine.log" 2>&1
cat "$out/machine.log"

mkdir -p /tmp/selfsup-data && tar xzf "$tarball" -C /tmp/selfsup-data
# shellcheck disable=SC2086
TAIL=30 stage run-gpu $((${budget%s} + 150)) "$py" -m selfsup run --preset gpu --dataset folder \
  --data-dir /tmp/selfsup-data/cifar10-jpg --budget "$budget" --out-dir /tmp/selfsup-runs \
  --name gpu-preset --device "$device" --no-progress ${RUN_ARGS:-}
for f in metrics.json config.json; do
  cp "/tmp/selfsup-runs/gpu-preset/$f" "$out/run-$f" 2>/dev/null
done
stage tests 120 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
# 30 warm-up steps and 20 a repeat: with the defaults (3 and 4, sized for a CPU's slower steps)
# the eager step on a GPU read 30 ms where the run's own steps took 25.
speed=(--preset gpu --device "$device" --warm 30 --steps 20)
stage throughput-eager 60 "$py" benchmarks/throughput.py "${speed[@]}"
for mode in default reduce-overhead; do
  stage "throughput-compile-$mode" 150 "$py" benchmarks/throughput.py "${speed[@]}" \
    --compile "$mode"
done
