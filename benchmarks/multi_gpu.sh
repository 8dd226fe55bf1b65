#!/usr/bin/env bash
# Multi-GPU scaling of `flexmoe train-expert` (issues 9 and 20):
#   bash benchmarks/multi_gpu.sh                       # 1B-class shape (preset base), 30 steps, 2 GPUs
#   NPROCS=4 bash benchmarks/multi_gpu.sh 7b 10         # the 7B shape on 4 GPUs (~5.5 min on H200s)
#   NPROCS="4 8" bash benchmarks/multi_gpu.sh 7b 10     # ... on 4 and 8 GPUs in one run (~8.5 min)
# Trains the same expert (random anchor of the shape from flexmoe.testing, random router row, a quarter of each batch
# public text, sequences of $SEQ, $BATCH per GPU and micro-step) with the same global batch in every row:
#   one          1 GPU, grad_accum = global / BATCH
#   fsdp2-N      N GPUs, accelerate launch --config_file recipes/accelerate/fsdp2.yaml
#   fsdp2keep-N  the same with --fsdp_reshard_after_forward false: each layer's gathered weights (the frozen ones
#                included) are kept from its forward to its backward instead of gathered twice
#   ddp-N        N GPUs, torchrun (every GPU holds the whole model; may not fit at 7b: reported as failed)
#   hsdp-N       HSDP through recipes/accelerate/hsdp_multinode.yaml as 2 "machines" of N/2 GPUs on this host: two
#                launches (--machine_rank 0 and 1, each with its half of the GPUs) meeting at 127.0.0.1; 2 replicas
#                x N/2 shards
# and prints steady-state tokens/s (first MULTI_GPU_WARMUP steps excluded), scaling against one GPU, MFU per GPU on
# executed FLOPs (benchmarks/train_bench.py's count), the largest peak memory of any GPU, and the largest and mean
# difference between each expert package and the 1-GPU one (HSDP also against the FSDP2 run of its size). All rows
# run eagerly (train.compile=false: FSDP does not compile yet), so the scaling compares like with like.
# Environment:
#   NPROCS   process counts (default 2)          ROWS   launches, of: one fsdp2 fsdp2keep ddp hsdp (default: all)
#   BATCH    sequences per GPU and micro-step (default 4; 7b: 2, what fits one GPU beside 79 GiB of weights and state)
#   GLOBAL   sequences per optimizer step (default BATCH x the largest of NPROCS)   SEQ  tokens a sequence (2048)
#   DEVICE   cuda, or cpu (gloo; tests/benchmarks/test_multi_gpu.py)   BF16  1 (default) or 0
#   WORK     working folder (default /tmp/flexmoe-multi-gpu-SHAPE)    PORT  first rendezvous port (default 29500)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SHAPE=${1:-base}
STEPS=${2:-30}
NPROCS=${NPROCS:-2}
ROWS=${ROWS:-one fsdp2 fsdp2keep ddp hsdp}
if [ "$SHAPE" = 7b ]; then BATCH=${BATCH:-2}; export MULTI_GPU_WARMUP=${MULTI_GPU_WARMUP:-3}; else BATCH=${BATCH:-4}; fi
MAXN=$(for n in $NPROCS; do echo "$n"; done | sort -n | tail -1)
GLOBAL=${GLOBAL:-$((BATCH * MAXN))}
export SEQ=${SEQ:-2048}
DEVICE=${DEVICE:-cuda}
BF16=${BF16:-1}
PORT=${PORT:-29500}
WORK=${WORK:-/tmp/flexmoe-multi-gpu-$SHAPE}
mkdir -p "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" benchmarks/multi_gpu.py setup "$WORK" "$SHAPE" || exit 1
ARGS=(--anchor "$WORK/anchor" --data "$WORK/data.jsonl" --name bench --set router.source=random --set "train.seq_len=$SEQ"
      --batch-size "$BATCH" --device "$DEVICE" --set train.warmup_steps=5 --set train.compile=false --overwrite
      --public-data "$WORK/data.jsonl")  # the default router training: a quarter of each batch public
[ "$BF16" = 1 ] && ARGS+=(--bf16)
rm -rf "$WORK"/one* "$WORK"/fsdp2* "$WORK"/ddp* "$WORK"/hsdp* "$WORK"/report.json
wants() { [[ " $ROWS " == *" $1 "* ]]; }
failed() {  # a launch that failed (e.g. out of memory): say so and leave it out of the report
    echo "!! $1 failed (exit $2)"
    rm -rf "${WORK:?}/$1" "$WORK/$1".json*
}
accum() {  # grad_accum for N processes, so every row sees GLOBAL sequences a step
    local n=$1
    if (( GLOBAL % (BATCH * n) )); then echo "GLOBAL $GLOBAL is not a multiple of $BATCH x $n" >&2; exit 1; fi
    echo $((GLOBAL / (BATCH * n)))
}
gpus() {  # the comma-separated GPU ids from $1 to $2 - 1
    seq -s, "$1" $(($2 - 1))
}
echo "== shape $SHAPE, $STEPS steps, $BATCH x $SEQ tokens per GPU and micro-step, $GLOBAL sequences a step"

if wants one; then
    echo "== 1 GPU"
    CUDA_VISIBLE_DEVICES=0 "$PY" benchmarks/multi_gpu.py run "$STEPS" "$WORK/one.json" "${ARGS[@]}" \
        --set "train.grad_accum=$(accum 1)" --out "$WORK/one" || failed one $?
fi
for N in $NPROCS; do
    A=$(accum "$N") || exit 1
    if wants fsdp2; then
        echo "== $N GPUs, FSDP2 (accelerate launch, reshard_after_forward true)"
        PORT=$((PORT + 1))
        "$PY" -m accelerate.commands.launch --config_file recipes/accelerate/fsdp2.yaml --num_processes "$N" \
            --main_process_port "$PORT" benchmarks/multi_gpu.py run "$STEPS" "$WORK/fsdp2-$N.json" "${ARGS[@]}" \
            --set "train.grad_accum=$A" --out "$WORK/fsdp2-$N" || failed "fsdp2-$N" $?
    fi
    if wants fsdp2keep; then
        echo "== $N GPUs, FSDP2, reshard_after_forward false"
        PORT=$((PORT + 1))
        "$PY" -m accelerate.commands.launch --config_file recipes/accelerate/fsdp2.yaml --num_processes "$N" \
            --fsdp_reshard_after_forward false --main_process_port "$PORT" \
            benchmarks/multi_gpu.py run "$STEPS" "$WORK/fsdp2keep-$N.json" "${ARGS[@]}" \
            --set "train.grad_accum=$A" --out "$WORK/fsdp2keep-$N" || failed "fsdp2keep-$N" $?
    fi
    if wants ddp; then
        echo "== $N GPUs, DDP (torchrun)"
        "$PY" -m torch.distributed.run --standalone --nproc_per_node "$N" \
            benchmarks/multi_gpu.py run "$STEPS" "$WORK/ddp-$N.json" "${ARGS[@]}" \
            --set "train.grad_accum=$A" --out "$WORK/ddp-$N" || failed "ddp-$N" $?
    fi
    if wants hsdp && (( N % 2 == 0 && N >= 4 )); then
        echo "== $N GPUs, HSDP: 2 machines x $((N / 2)) GPUs (recipes/accelerate/hsdp_multinode.yaml)"
        PORT=$((PORT + 1))
        HALF=$((N / 2))
        HSDP=(--config_file recipes/accelerate/hsdp_multinode.yaml --num_machines 2 --num_processes "$N"
              --main_process_ip 127.0.0.1 --main_process_port "$PORT"
              --parallelism_config_dp_replicate_size 2 --parallelism_config_dp_shard_size "$HALF")
        RUN=(benchmarks/multi_gpu.py run "$STEPS" "$WORK/hsdp-$N.json" "${ARGS[@]}" --set "train.grad_accum=$A"
             --out "$WORK/hsdp-$N")
        CUDA_VISIBLE_DEVICES=$(gpus 0 "$HALF") "$PY" -m accelerate.commands.launch "${HSDP[@]}" --machine_rank 0 \
            "${RUN[@]}" &
        FIRST=$!
        CUDA_VISIBLE_DEVICES=$(gpus "$HALF" "$N") "$PY" -m accelerate.commands.launch "${HSDP[@]}" --machine_rank 1 \
            "${RUN[@]}"
        RC2=$?
        wait "$FIRST"
        RC1=$?
        (( RC1 || RC2 )) && failed "hsdp-$N" "$RC1/$RC2"
    fi
done
echo
"$PY" benchmarks/multi_gpu.py report "$WORK"
