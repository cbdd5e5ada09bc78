#!/usr/bin/env bash
# The GPU benchmarks in one run (ViT-B-16 architecture, random weights, bf16 autocast):
# throughput at batch 32 in fp32 and bf16 with MFU, peak memory, the full fine-tuning baseline,
# each lever's ratio and the largest batch that fits; ViCLIP-B-16 beside ViT-B-16; whether the
# real loader keeps the step busy; the cost of L_CC (cached vs re-encoded descriptions), adapter
# depth, inference latency, MSTA vs full fine-tuning, then the synthetic-world recipe sweep.
# Every script prints ratios measured side by side. Usage: bash benchmarks/gpu_train.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-gpu-results}
mkdir -p "$out"
common=(--model ViT-B-16 --device cuda --precision bf16)
python gpu_throughput.py --device cuda --batch 32 | tee "$out/gpu_throughput.txt"
python viclip_step.py --device cuda --precision bf16 --batch 32 | tee "$out/viclip_step.txt"
python input_pipeline.py --model ViT-B-16 --device cuda --precision bf16 --batch 32 --workers 12 | tee "$out/input_pipeline.txt"
python train_step.py "${common[@]}" --batch 4 --frames 8 --classes 174 | tee "$out/train_step.txt"
python adapter_depth.py "${common[@]}" --batch 4 | tee "$out/adapter_depth.txt"
python inference_latency.py "${common[@]}" | tee "$out/inference_latency.txt"
python full_finetune.py "${common[@]}" --batch 4 | tee "$out/full_finetune.txt"
python world_recipe_sweep.py --device cuda --epochs 30 | tee "$out/world_recipe_sweep.jsonl"
