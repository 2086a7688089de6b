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

if [ "$SCALE" = tiny ]; then
    HEADS_ARGS=(--seed 2027 --pairs 24 --epochs 1 --methods shard-blocks,joint,branches,ensemble)
    BON_ARGS=(--seeds 2 --pool-size 64 --prompts 2 --pairs 48 --epochs 1)
    T_HEADS=400; T_BON=600
else
    HEADS_ARGS=(--seed 2027 --pairs 1200 --epochs 2
                --methods shard,shard-blocks,joint,bootstrap,branches,branches-1,frozen-shard,ensemble)
    BON_ARGS=(--seeds 10 --pool-size 2048 --prompts 8 --pairs 1200 --epochs 2)
    T_HEADS=${T_HEADS:-75}; T_BON=${T_BON:-210}
fi

stamp "stage 1: heads table (clean labels, one seed), timeout ${T_HEADS}s"
timeout -k 10 "$T_HEADS" "$PY" -m training experiment heads-pretrained "${HEADS_ARGS[@]}" \
    --device auto --frozen-layers 0 --out "$OUT"
echo "stage 1 exit $?"

stamp "stage 2: best-of-n with a labeller bias, timeout ${T_BON}s"
timeout -k 10 "$T_BON" "$PY" -m training experiment overopt-pretrained "${BON_ARGS[@]}" \
    --device auto --frozen-layers 0 --bias 1.0 --gaming-share 0.02 --noise 0.1 \
    --methods joint,shard-blocks,branches,ensemble --prefix overopt-pretrained --out "$OUT"
echo "stage 2 exit $?"

stamp "done"
ls -la "$OUT"
