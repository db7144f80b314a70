#!/usr/bin/env bash
# icl against lm-evaluation-harness on a GPU, in one go (no GPU on the development machines or in CI, so
# this is run by hand when one is lent): GPT-Neo-125M's shape (the random-init model of `cargo xtask
# setup`), LAMBADA all 5153 rows and PIQA all 1838, f32 and bf16; lm-eval's HF backend on the same GPU
# at batch sizes 1, 32 and auto; whole-process seconds and ratios; then scripts/gpu_check.sh. Writes
# one markdown table (docs/gpu_bench.md, or $1) and prints it. Meant to finish within 10 minutes on an
# H100-class GPU: each process runs both tasks (one model load per run).
#
# libtorch: a CUDA torch 2.11 that the machine's python3 already imports is linked as it is (LIBTORCH);
# otherwise `cargo xtask setup --torch full` installs pip's CUDA torch 2.11 into the project's venv.
# Exit status 0 only when every run succeeded and gpu_check passed.
set -uo pipefail
cd "$(dirname "$0")/.."
report=${1:-docs/gpu_bench.md}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

nvidia-smi -L || { echo "no GPU (nvidia-smi failed)"; exit 1; }
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)

# A CUDA torch 2.11 of the machine's own python3, or the venv's after setup.
own_torch=$(python3 -c 'import torch, os; assert torch.__version__.startswith("2.11") and torch.cuda.is_available(); print(os.path.dirname(torch.__file__))' 2>/dev/null)
if [ -n "$own_torch" ]; then
  echo "linking the machine's torch: $own_torch"
  export LIBTORCH="$own_torch"
  export LD_LIBRARY_PATH="$own_torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  venv_python=python3
  python3 -c 'import lm_eval, transformers' 2>/dev/null || { echo "python3 lacks lm_eval/transformers: running setup"; own_torch=""; }
fi
if [ -z "$own_torch" ]; then
  cargo xtask setup --torch full || { echo "cargo xtask setup --torch full failed"; exit 1; }
  venv_python=${ICL_VENV:-$HOME/.cache/icl/venv}/bin/python
fi
cargo build --release -q -p icl-cli || { echo "building icl failed"; exit 1; }
icl=target/release/icl
models=${ICL_MODELS:-$HOME/.cache/icl/models}
data=${ICL_DATA:-../shared/data/icl}
model=$models/gpt-neo-125m-random
[ -f "$model/config.json" ] || { echo "$model: missing (cargo xtask setup makes it)"; exit 1; }
out=$(mktemp -d)

# Wall seconds of a command, its output to $out/$1.log; "failed" when it fails or runs past $2 seconds.
timed() {
  local name=$1 limit=$2
  shift 2
  local start end
  start=$(date +%s.%N)
  if timeout "$limit" "$@" >"$out/$name.log" 2>&1; then
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }'
  else
    tail -5 "$out/$name.log" >&2
    fail "$name"
    echo failed
  fi
}
ratio() { [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]] && awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b / a }' || echo "-"; }

rows=""
for dtype in f32 bf16; do
  torch_dtype=$([ "$dtype" = f32 ] && echo float32 || echo bfloat16)
  echo "== icl $dtype"
  icl_s=$(timed "icl_$dtype" 300 "$icl" eval --quiet --model "$model" --dtype "$dtype" \
    --task "lambada=$data/lambada_openai.jsonl" --task "piqa=$data/piqa.jsonl" --output "$out/icl_$dtype.json")
  for batch in 1 32 auto; do
    echo "== lm-eval $dtype batch $batch"
    lm_s=$(timed "lm_eval_${dtype}_$batch" 300 env PY="$venv_python" DATA_DIR="$data" BATCH_SIZE="$batch" \
      DTYPE="$torch_dtype" DEVICE=cuda bash scripts/run_lm_eval.sh "$model" "$out/lm_eval_${dtype}_$batch" "" \
      icl_lambada,icl_piqa)
    rows+="| LAMBADA 5153 + PIQA 1838 | $dtype | $batch | $icl_s | $lm_s | $(ratio "$icl_s" "$lm_s")x |"$'\n'
  done
done

echo "== gpu_check"
bash scripts/gpu_check.sh >"$out/gpu_check.log" 2>&1 && check="passed" || { check="FAILED"; fail "gpu_check"; }
tail -3 "$out/gpu_check.log"

mkdir -p "$(dirname "$report")"
cat >"$report" <<TABLE
# icl against lm-evaluation-harness on a GPU

\`scripts/gpu_bench.sh\` on $gpu, $(date -u). Model: GPT-Neo-125M's shape (\`gpt-neo-125m-random\`),
LAMBADA (all 5153 rows) and PIQA (all 1838) in one process each; lm-eval 0.4.13, HF backend on the same GPU.
Seconds are whole-process wall time (start-up and model load included); speed-up is lm-eval's over icl's.

| tasks | dtype | lm-eval batch | icl s | lm-eval s | speed-up |
|---|---|---|---|---|---|
${rows}
scripts/gpu_check.sh: $check. Logs: $out.
TABLE
cat "$report"
echo "gpu_bench: $failures failure(s)"
[ $failures -eq 0 ]
