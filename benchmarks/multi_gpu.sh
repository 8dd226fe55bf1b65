#!/usr/bin/env bash
# Multi-GPU scaling of `flexmoe train-expert` (issue 9), on a machine with 2 GPUs:
#   bash benchmarks/multi_gpu.sh            # 1B-class shape (preset base), 30 steps
#   bash benchmarks/multi_gpu.sh small 40   # preset small, 40 steps
# Trains the same expert (random anchor of the preset's shape from flexmoe.testing, random router row, bf16,
# sequences of 2048, 4 per GPU and micro-step) three ways with the same global batch of 8 sequences:
#   one   : 1 GPU, grad_accum 2
#   fsdp2 : 2 GPUs, accelerate launch --config_file recipes/accelerate/fsdp2.yaml
#   ddp   : 2 GPUs, torchrun
# and prints steady-state tokens/s (first 5 steps excluded), the scaling against one GPU (goal >= 1.8x) and the
# largest and mean difference between each expert package and the 1-GPU one. All three run eagerly
# (train.compile=false: FSDP does not compile yet), so the scaling compares like with like. About 5 minutes at base.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PRESET=${1:-base}
STEPS=${2:-30}
WORK=${WORK:-/tmp/flexmoe-multi-gpu-$PRESET}
mkdir -p "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" benchmarks/multi_gpu.py setup "$WORK" "$PRESET"
ARGS=(--anchor "$WORK/anchor" --data "$WORK/data.jsonl" --name bench --router-source random --seq-len 2048
      --batch-size 4 --bf16 --device cuda --set train.warmup_steps=5 --set train.compile=false --overwrite
      --public-data "$WORK/data.jsonl")  # the default router training: a quarter of each batch public
rm -rf "$WORK"/one "$WORK"/fsdp2 "$WORK"/ddp "$WORK"/*.json

echo "== 1 GPU"
CUDA_VISIBLE_DEVICES=0 "$PY" benchmarks/multi_gpu.py run "$STEPS" "$WORK/one.json" "${ARGS[@]}" \
    --grad-accum 2 --out "$WORK/one"
echo "== 2 GPUs, FSDP2 (accelerate launch)"
"$PY" -m accelerate.commands.launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 \
    benchmarks/multi_gpu.py run "$STEPS" "$WORK/fsdp2.json" "${ARGS[@]}" --out "$WORK/fsdp2"
echo "== 2 GPUs, DDP (torchrun)"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
    benchmarks/multi_gpu.py run "$STEPS" "$WORK/ddp.json" "${ARGS[@]}" --out "$WORK/ddp"
echo
"$PY" benchmarks/multi_gpu.py report "$WORK"
