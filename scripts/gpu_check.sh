#!/usr/bin/env bash
# The NCCL backend on a GPU machine, in one go (no GPU on the development machines or in CI, so this is
# run by hand when one is lent). Needs the repository set up there (`cargo xtask setup --torch full`:
# a CUDA libtorch, Open MPI), and a CUDA driver. Checks:
#   1. world size 1 over NCCL: every collective with real NCCL calls on CUDA tensors;
#   2. 2 processes on one GPU over NCCL (torchrun): with 2+ GPUs every collective must agree; on one
#      GPU NCCL refuses two ranks per device, and the job must end with that error, not hang;
#   3. 2 processes on one GPU, data-parallel `icl eval` (MPI between ranks, the model on the GPU):
#      samples byte-identical to one rank;
#   4. with 2+ GPUs, data-parallel `icl eval` under torchrun over NCCL, identical to one rank.
# Exit status 0 only when every check that this machine allows passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

nvidia-smi -L || { echo "no GPU (nvidia-smi failed)"; exit 1; }
gpus=$(nvidia-smi -L | wc -l)
# cudarc loads `libnccl.so`; pip's wheel has only libnccl.so.2 (setup links .icl/nccl/libnccl.so to it).
if [ -e .icl/nccl/libnccl.so ]; then
  export LD_LIBRARY_PATH="$PWD/.icl/nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
features=nccl
have_mpi=0
if command -v mpirun >/dev/null && command -v mpicc >/dev/null; then features=nccl,mpi; have_mpi=1; fi
cargo build --release -q -p icl-shard --features "$features" --example collective_check || exit 1
cargo build --release -q -p icl-cli --features "$features" || exit 1
check=target/release/examples/collective_check
icl=target/release/icl
venv=${ICL_VENV:-$HOME/.cache/icl/venv}
models=${ICL_MODELS:-$HOME/.cache/icl/models}
data=${ICL_DATA:-../shared/data/icl}
out=$(mktemp -d)

echo "== 1. one rank, NCCL on GPU 0"
timeout 120 "$check" --dist nccl --cuda || fail "one-rank NCCL collectives"

echo "== 2. two processes over NCCL ($gpus GPU(s))"
timeout 120 "$venv/bin/torchrun" --standalone --nproc-per-node 2 --no-python "$check" --dist nccl --cuda \
  >"$out/two.txt" 2>&1
rc=$?
cat "$out/two.txt" | tail -20
if [ "$gpus" -ge 2 ]; then
  [ $rc -eq 0 ] || fail "two-rank NCCL collectives"
else
  [ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "two NCCL ranks on one GPU should end with an error, not hang or pass (rc $rc)"
  grep -q "NCCL" "$out/two.txt" || fail "the error of two NCCL ranks on one GPU does not name NCCL"
fi

args=(eval --quiet --model "$models/gpt-neo-125m-random" --limit 200
      --task "lambada=$data/lambada_openai.jsonl" --task "piqa=$data/piqa.jsonl")
echo "== 3. one rank vs two processes on one GPU (data parallel over MPI)"
"$icl" "${args[@]}" --output "$out/r1.json" --log-samples "$out/s1.jsonl" || fail "one-rank eval on the GPU"
if [ $have_mpi -eq 1 ]; then
  timeout 600 mpirun -np 2 --bind-to none "$icl" "${args[@]}" --dist mpi --output "$out/r2.json" \
    --log-samples "$out/s2.jsonl" || fail "two-rank eval over MPI"
  cmp "$out/s1.jsonl" "$out/s2.jsonl" && echo "samples identical" || fail "samples differ between 1 and 2 ranks"
else
  echo "skipped: Open MPI is not installed here"
fi

if [ "$gpus" -ge 2 ]; then
  echo "== 4. two GPUs, data parallel over NCCL under torchrun"
  timeout 600 "$venv/bin/torchrun" --standalone --nproc-per-node 2 --no-python "$icl" "${args[@]}" --dist nccl \
    --output "$out/rn.json" --log-samples "$out/sn.jsonl" || fail "two-rank eval over NCCL"
  cmp "$out/s1.jsonl" "$out/sn.jsonl" && echo "samples identical" || fail "samples differ between 1 rank and 2 NCCL ranks"
fi
echo "gpu_check: $failures failure(s); outputs in $out"
[ $failures -eq 0 ]
