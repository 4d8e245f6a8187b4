#!/usr/bin/env bash
# The CUDA path on a GPU machine, in one call: its tests, the pretraining step's speed, and a
# short pretraining of the gpu preset on the CIFAR-10 JPEG copy with its evaluation.
#
#   bash benchmarks/gpu_check.sh CIFAR10_JPG_TARBALL OUT_DIR [BUDGET]
#
# Runs from the source tree (PYTHONPATH=src) with the machine's own torch. Each stage has its
# own time limit and a failed stage does not stop the next; logs and the run's metrics.json,
# config.json and report go to OUT_DIR. BUDGET (default 120s) is the pretraining's --budget.
set -u
tarball=${1:?the cifar10-jpg.tar.gz file}
out=${2:?a folder for the logs}
budget=${3:-120s}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of the script itself

stage() {  # stage NAME SECONDS COMMAND...: run it under a limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  tail -n "${TAIL:-12}" "$out/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$py" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'python', platform.python_version(), torch.cuda.get_device_name(0) if torch.cuda.is_available()
else 'no CUDA')"
  nproc
} > "$out/machine.log" 2>&1
cat "$out/machine.log"

stage tests 170 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
for variant in "--precision bf16" "--precision bf16 --cudnn-benchmark" "--precision fp32"; do
  name=throughput-gpu-$(echo "$variant" | tr -d ' -' | sed 's/precision//')
  # shellcheck disable=SC2086
  stage "$name" 60 "$py" benchmarks/throughput.py --preset gpu --device "$device" $variant
done
stage throughput-cpupreset 60 "$py" benchmarks/throughput.py --preset cpu --device "$device" \
  --width 64 --view-size 20
# The training loop itself: jitters grouped (the CPU's way), whole-batch, and views drawn ahead.
stage loop-gpu 150 "$py" benchmarks/loop_speed.py --preset gpu --device "$device" --steps 300
stage loop-cpupreset 120 "$py" benchmarks/loop_speed.py --preset cpu --device "$device" \
  --width 64 --view-size 20 --steps 300

mkdir -p /tmp/selfsup-data && tar xzf "$tarball" -C /tmp/selfsup-data
TAIL=30 stage run-gpu 330 "$py" -m selfsup run --preset gpu --dataset folder \
  --data-dir /tmp/selfsup-data/cifar10-jpg --budget "$budget" --out-dir /tmp/selfsup-runs \
  --name gpu-preset --device "$device" --no-progress
for f in metrics.json config.json; do
  cp "/tmp/selfsup-runs/gpu-preset/$f" "$out/run-$f" 2>/dev/null
done
