#!/usr/bin/env bash
# Run lm-eval (HF backend, CPU, float32, offline) on the icl_* tasks with per-sample logs.
#
# Usage: scripts/run_lm_eval.sh MODEL_DIR OUT_DIR [LIMIT] [TASKS]
#   LIMIT  docs per task (default: all); TASKS default icl_lambada,icl_piqa,icl_hellaswag
#   env:   DATA_DIR (default /work/shared/data/icl), BATCH_SIZE (default 32), DTYPE (default float32),
#          PY (default venv python), NUM_FEWSHOT (set: --num_fewshot N, shots from the test split itself),
#          LM_EVAL_ARGS (more lm_eval arguments, split on spaces), DEVICE (default cpu; cuda on a GPU)
# Writes task YAMLs to OUT_DIR/tasks, results to OUT_DIR/<model path with / -> __>/results_<ts>.json and
# samples to OUT_DIR/<...>/samples_<task>_<ts>.jsonl.
set -euo pipefail
MODEL=${1:?MODEL_DIR}; OUT=${2:?OUT_DIR}; LIMIT=${3:-}; TASKS=${4:-icl_lambada,icl_piqa,icl_hellaswag}
PY=${PY:-$HOME/.cache/icl/venv/bin/python}
DTYPE=${DTYPE:-float32}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" "$(dirname "$0")/lm_eval_tasks.py" --data-dir "${DATA_DIR:-/work/shared/data/icl}" --out "$OUT/tasks" \
  ${NUM_FEWSHOT:+--fewshot-split} >/dev/null
exec "$PY" -m lm_eval --model hf --model_args "pretrained=$MODEL,dtype=$DTYPE" \
  --tasks "$TASKS" --include_path "$OUT/tasks" --device "${DEVICE:-cpu}" --batch_size "${BATCH_SIZE:-32}" \
  ${LIMIT:+--limit "$LIMIT"} ${NUM_FEWSHOT:+--num_fewshot "$NUM_FEWSHOT"} --log_samples --output_path "$OUT" ${LM_EVAL_ARGS:-}
