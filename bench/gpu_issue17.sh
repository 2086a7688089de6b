#!/usr/bin/env bash
# Issue 17 on a GPU host: the heads table and best-of-n on the pretrained MiniLM, full fine-tune
# (--frozen-layers 0: only the embedding output is cached; all 6 layers + pooler + heads train), fp32.
#
#   OUT=/some/dir bash bench/gpu_issue17.sh            # device run, from the repo root (~5 min on an H200)
#   OUT=/tmp/out17 SCALE=tiny PY=.venv/bin/python bash bench/gpu_issue17.sh   # CPU dry run (~3 min)
#
# Needs, carried beside the tree (both git-ignored): .whl/ (pure-python wheels the host lacks:
# vaderSentiment, pydantic + pydantic_core + their deps) and .minilm/ (`python bench/pack_minilm.py`:
# an fp16 copy of all-MiniLM-L6-v2, loaded as fp32; the device numbers are on fp16-ROUNDED weights).
# Writes into $OUT (flat, 7 files): heads-pretrained.md/.json, overopt-pretrained.md/.json/.png,
# gpu_issue17.log, env.txt. Each stage has a timeout; both commands save after every method / seed,
# so a stage cut short leaves its finished part.
set -u
OUT=${OUT:?set OUT to the folder whose files come back}
SCALE=${SCALE:-full}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
LOG="$OUT/gpu_issue17.log"
exec > >(tee -a "$LOG") 2>&1
t0=$(date +%s)
stamp() { echo "== $(date -u +%H:%M:%S) (+$(( $(date +%s) - t0 ))s) $*"; }

stamp "install carried wheels into $SITE"
if ls .whl/*.whl >/dev/null 2>&1; then
    if ! "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl; then
        echo "pip install of all wheels failed; one at a time (a wheel for another Python is skipped)"
        for w in .whl/*.whl; do "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$w" || true; done
    fi
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${HYDRA_RM_MINILM_DIR:-}" ] && [ -f .minilm/model.safetensors ]; then
    export HYDRA_RM_MINILM_DIR="$PWD/.minilm"
fi
export TOKENIZERS_PARALLELISM=false

{
    date -u
    echo "SCALE=$SCALE PY=$PY HYDRA_RM_MINILM_DIR=${HYDRA_RM_MINILM_DIR:-<package>}"
    git log -1 --oneline 2>/dev/null || true
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PY" - <<'PY'
import torch, transformers, platform
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
import pydantic, vaderSentiment, training.overopt_pretrained as op
print("pydantic", pydantic.__version__, "minilm", op.minilm_path())
PY
    cat "${HYDRA_RM_MINILM_DIR:-/dev/null}/PACKED.txt" 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

PARTS=${PARTS:-/tmp/gpu17-parts}
rm -rf "$PARTS"; mkdir -p "$PARTS"
if [ "$SCALE" = tiny ]; then
    HEADS_ARGS=(--seed 2027 --pairs 24 --epochs 1 --methods shard-blocks,joint,branches,ensemble)
    BON_ARGS=(--pool-size 64 --prompts 2 --pairs 48 --epochs 1)
    SPLITS=("0 1" "1 1")  # first-seed, seeds per process
    T_HEADS=${T_HEADS:-600}; T_BON=${T_BON:-900}
else
    HEADS_ARGS=(--seed 2027 --pairs 1200 --epochs 2
                --methods shard,shard-blocks,joint,bootstrap,branches,branches-1,frozen-shard,ensemble)
    BON_ARGS=(--pool-size 2048 --prompts 8 --pairs 1200 --epochs 2)
    SPLITS=("0 4" "4 3" "7 3")  # 10 seeds in 3 processes sharing the GPU (each step is launch-bound)
    T_HEADS=${T_HEADS:-240}; T_BON=${T_BON:-250}
fi

# All processes run side by side on the one GPU: a small model's step is bound by kernel launches and
# Python, so processes overlap; training seconds in the tables are measured under this sharing (the
# ratios between methods of one process are what to read).
stamp "stage 1 (background): heads table (clean labels, one seed), timeout ${T_HEADS}s"
timeout -k 10 "$T_HEADS" "$PY" -m training experiment heads-pretrained "${HEADS_ARGS[@]}" \
    --device auto --frozen-layers 0 --out "$OUT" > "$PARTS/heads.log" 2>&1 &
pids=($!)
stamp "stage 2: best-of-n with a labeller bias, ${#SPLITS[@]} processes, timeout ${T_BON}s"
for sp in "${SPLITS[@]}"; do
    set -- $sp
    timeout -k 10 "$T_BON" "$PY" -m training experiment overopt-pretrained "${BON_ARGS[@]}" \
        --seeds "$2" --first-seed "$1" \
        --device auto --frozen-layers 0 --bias 1.0 --gaming-share 0.02 --noise 0.1 \
        --methods joint,shard-blocks,branches,ensemble --prefix "part-s$1" --out "$PARTS" \
        > "$PARTS/part-s$1.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; echo "pid $p exit $?"; done
for f in "$PARTS"/*.log; do echo "---- $f"; grep -v '^[│╭╰]' "$f" | tail -40; done

stamp "merge the seed ranges into $OUT/overopt-pretrained.*"
parts=$(ls "$PARTS"/part-s*.json 2>/dev/null)
if [ -n "$parts" ]; then
    "$PY" -m training.overopt_pretrained_report "$OUT" $parts
else
    echo "no best-of-n seed finished"
fi

stamp "done"
ls -la "$OUT"
