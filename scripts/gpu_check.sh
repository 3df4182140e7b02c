#!/usr/bin/env bash
# Every GPU check in one command, for a GPU machine lent for minutes: the GPU tests (`pytest -m gpu`: the smoke
# pipeline under trainer=gpu, FSDP exports, a session on CUDA scoring like one on the CPU) after the training-step
# and decode benchmarks on CUDA at the defaults and at larger sizes (numbers first, should the machine's time run
# out; ~1.5 min of benchmarks, ~2.6 min of tests on an H200). Each step runs under its own
# time limit and the next runs whatever the last did; logs and the benchmarks' JSON land in OUT_DIR. Exit status: the number of failed steps.
# Usage: scripts/gpu_check.sh OUT_DIR        (PY=python by default: the interpreter that holds torch with CUDA)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
PY=${PY:-python}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
failed=0

step() {  # step NAME SECONDS CMD...: run CMD with a limit, its output in OUT_DIR/NAME.log, a one-line verdict here
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "== $name: rc=$rc in $(($(date +%s) - start)) s"
  tail -n 4 "$out/$name.log"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c '
import importlib, torch
print(\"cuda\", torch.version.cuda, \"devices\", torch.cuda.device_count(), torch.cuda.get_device_name(0))
for m in (\"lightning\", \"transformers\", \"torchmetrics\", \"mlflow\", \"optuna\", \"hydra\", \"datasets\", \"lm_eval\"):
    print(m, importlib.import_module(m).__version__)
'"
# the benchmarks' JSON as `report --bench` reads a machine's subfolder: OUT_DIR/default/ and OUT_DIR/larger/ are
# reports/bench/h200/ and reports/bench/h200-larger/ (rename to the machine, copy, `python -m mchar report --bench`)
# train-step runs 48 steps per side and repeat on the GPU (12 on the CPU): a 12-step side lasts ~0.3 s there, and the
# shared host's drift between such short windows spread the GistNet Lightning/plain pairs 0.84-1.10 (stop 31)
mkdir -p "$out/default" "$out/larger"
step bench_default 300 bash -c "set -e
  $PY -m mchar bench --out $out/default/train-step.json train-step --device cuda --steps 48
  $PY -m mchar bench --out $out/default/decode.json decode --device cuda --threads 0"
step bench_larger 300 bash -c "set -e
  $PY -m mchar bench --out $out/larger/train-step.json train-step --device cuda --steps 48 --hidden 128 --window 1024 \
    --block-size 16 --horizon 64 --vocab 4096
  $PY -m mchar bench --out $out/larger/decode.json decode --device cuda --threads 0 --hidden 1024 --layers 8 \
    --heads 16"
step gpu_tests 400 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rs tests/test_gpu.py
exit "$failed"
