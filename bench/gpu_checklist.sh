#!/usr/bin/env bash
# The README's "First GPU session" checklist as one script for a lent GPU machine (steps 1-3), each step
# under its own timeout so one that hangs leaves the others' results. Results go to $OUT (default
# /tmp/gpu-out). Pure-python wheels the machine lacks (fastapi, pydantic, uvicorn, ...) may be carried in
# .whl/ and are installed into /tmp/site first. Usage: `OUT=... bash bench/gpu_checklist.sh [e2e|all]`.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log="$OUT/checklist.log"
step() {  # step NAME SECONDS CMD...: time-limited, output appended to the log with its exit status
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s) $(date -u +%T)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$secs" "$@" >>"$log" 2>&1
  echo "=== $name rc=$? in $((SECONDS - t0))s" | tee -a "$log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} >>"$log" 2>&1
what=${1:-all}
if [ "$what" = all ]; then
  step "1. tests/gpu" 120 python3 -m pytest tests/gpu -q -p no:cacheprovider -o addopts=-ra
  step "novelty cost" 240 python3 bench/gpu_novelty.py --items 256 --rounds 6 --out "$OUT/novelty-gpu.md"
  step "2. kernel bench" 100 python3 bench/bench_multihead_reward.py --out "$OUT/kernel-gpu.md"
  step "3. gpu_e2e (no service)" 140 python3 bench/gpu_e2e.py --no-service --items 256 --repeats 3 --out "$OUT/gpu-e2e.md"
fi
if [ "$what" = e2e ]; then
  step "3. gpu_e2e (with service)" 420 python3 bench/gpu_e2e.py --items 256 --repeats 3 --out "$OUT/gpu-e2e-service.md"
fi
tail -c 2000 "$log"
