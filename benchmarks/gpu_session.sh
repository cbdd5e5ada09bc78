#!/usr/bin/env bash
# One short GPU lease, most important first, each step under the time still left (steps that no
# longer fit are skipped and say so): the CUDA tests; the pipeline itself on the GPU through the
# CLI (synth -> describe -> train --recipe demo in bf16 -> evaluate, then the same training under
# torchrun with NCCL, then report); then gpu_train.sh's benchmarks with fewer repetitions.
# Every step's output lands in OUT_DIR/NAME.txt as it runs.
#   bash benchmarks/gpu_session.sh OUT_DIR [BUDGET_SECONDS=500]
set -uo pipefail
(( $# )) || { echo "usage: bash benchmarks/gpu_session.sh OUT_DIR [BUDGET_SECONDS]" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd) || exit 2
deadline=$(( $(date +%s) + ${2:-500} ))
py=$(command -v "${PYTHON:-python3}") || { echo "no ${PYTHON:-python3}" >&2; exit 2; }
[[ $py == /* ]] || py=$PWD/$py  # absolute, for the steps run from benchmarks/ (not resolved: a venv's link)
failed=0
dev=${DEVICE:-cuda}  # DEVICE=cpu EPOCHS=1: a smoke run of the pipeline step without a GPU
export PYTHONUNBUFFERED=1

step() {  # step NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2 left=$(( deadline - $(date +%s) ))
  shift 2
  if (( left < 20 )); then echo "== $name: skipped, ${left} s left" | tee -a "$out/summary.txt"; return; fi
  (( cap > left )) && cap=$left
  local start=$(date +%s)
  timeout --kill-after 5 "$cap" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  (( rc )) && failed=1
  echo "== $name: exit $rc in $(( $(date +%s) - start )) s (cap $cap s)" | tee -a "$out/summary.txt"
  tail -n 25 "$out/$name.txt"
}

pipeline() {  # the CLI on the synthetic world, on the GPU, in a fresh home
  set -u
  local w=/tmp/gpu-world h=/tmp/gpu-home cli=("$py" -m pipeline)
  rm -rf "$w" "$h"
  "${cli[@]}" synth --out "$w" --videos-per-class 36 || return  # writes the descriptions files too
  local common=(--dataset world --config "$w/msta.toml" --home "$h" --no-progress)
  for kind in spatial temporal; do
    "${cli[@]}" describe "${common[@]}" --from-file "$w/descriptions_$kind.json" --kind "$kind" || return
  done
  local train=(train --recipe demo "${common[@]}" --device "$dev" --workers 8 ${EPOCHS:+--epochs "$EPOCHS"})
  "${cli[@]}" "${train[@]}" || return
  "${cli[@]}" evaluate "${common[@]}" --device "$dev" || return
  "$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m pipeline "${train[@]}" --seed 2 || return
  "${cli[@]}" evaluate "${common[@]}" --device "$dev" || return
  "${cli[@]}" report --home "$h" || return
  "${cli[@]}" sql "select stage, round(seconds, 1) as seconds, status from runs order by started_at" --home "$h"
}

cd "$root"
step environment 30 bash -c 'nvidia-smi; "$0" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"' "$py"
step cuda-tests 120 "$py" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_model_runtime.py
export -f pipeline; export py dev
step pipeline 200 bash -c pipeline
cd benchmarks
common=(--model ViT-B-16 --device cuda --precision bf16)
# Without the compile levers: on the H200 their compilation alone outlasted 150 s (gpu_train.sh has them).
step gpu_throughput 150 "$py" gpu_throughput.py --device cuda --batch 32 --reps 5 \
  --levers prefix-with-grad,torch-attention,fused-adamw,host-sync --max-batch 512
step train_step 60 "$py" train_step.py "${common[@]}" --batch 4 --frames 8 --classes 174
step inference_latency 45 "$py" inference_latency.py "${common[@]}"
step full_finetune 60 "$py" full_finetune.py "${common[@]}" --batch 4 --rounds 1
step viclip_step 90 "$py" viclip_step.py --device cuda --precision bf16 --batch 32 --rounds 1
step adapter_depth 60 "$py" adapter_depth.py "${common[@]}" --batch 4 --rounds 1
exit $failed
