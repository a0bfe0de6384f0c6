#!/bin/bash
# Device checks for the CUDA path, run on a lent GPU machine with target/gpu carried
# (tools/gpu_bundle.sh makes it), as `BUDGET=470 bash tools/gpu_check.sh` under a
# run timeout a little above BUDGET. In order of what matters most:
#   1. tests: the cuBLAS seam against Burn's matmul; the CubeCL kernels (flash
#      attention, NF4) against their references;
#   2. a smoke step on the tiny preset;
#   3. CPU-vs-CUDA losses on the tiny fixture (PASS/FAIL);
#   3b. NCCL: `xtuner collective-check` with one rank, and with two ranks on the one GPU
#      (NCCL_MULTI_RANK_GPU_ENABLE=1) when the machine's NCCL is 2.30 or newer;
#   4. `xtask bench train` against PyTorch, with whatever time is left;
#   5. extras if time remains: the smoke with Burn's GEMM and with materialised
#      attention, a greedy chat, the LoRA bench with materialised attention.
# Steps 1-3b are capped so that BENCH_RESERVE seconds stay for the bench. Results land
# in $OUT as eight files (the device returns at most eight).
: "${OUT:?OUT must name the folder whose files come back}"
export CUDA_PATH=/usr/local/cuda
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
BUDGET=${BUDGET:-470}
BENCH_RESERVE=${BENCH_RESERVE:-300}
G=$PWD/target/gpu
X=$G/xtuner
tar xzf "$G/bin.tar.gz" -C "$G"

# At most $1 seconds, and never into the time kept for the bench (5 s at least).
cap() {
    local t=$((BUDGET - BENCH_RESERVE - SECONDS))
    [ "$t" -gt "$1" ] && t=$1
    [ "$t" -lt 5 ] && t=5
    echo "$t"
}
# The reference side runs on PyTorch's own CUDA libraries, not the toolkit's.
printf '#!/bin/sh\nunset LD_LIBRARY_PATH\nexec python3 "$@"\n' > /tmp/py3 && chmod +x /tmp/py3

{
    echo "bundle from commit $(cat "$G/commit.txt" 2>/dev/null)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    /tmp/py3 -c "import torch,transformers,peft;print('torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__)"
    /tmp/py3 -c "import bitsandbytes as b;print('bitsandbytes',b.__version__)" 2>&1 | tail -1
    ls /usr/local/cuda/lib64 | grep -E '^lib(nvrtc|cublas)' | head -8
    nproc; date -u
} > "$OUT/env.txt" 2>&1

echo "== 1. tests $SECONDS"
{
    timeout -k 10 "$(cap 90)" "$G/cuda_gemm"; echo "cuda_gemm rc $?"
    timeout -k 10 "$(cap 150)" "$G/cube_kernels"; echo "cube_kernels rc $?"
} > "$OUT/tests.txt" 2>&1
grep -E "^test |rc [0-9]+$|panicked" "$OUT/tests.txt" | tail -12

smoke() {
    timeout -k 10 "$(cap "$1")" "$X" bench --device cuda --preset internlm2-tiny \
        --vocab-size 1000 --seq-len 256 --warmup 1 --steps 3
}
echo "== 2. smoke $SECONDS"
{ smoke 60; echo "smoke rc $?"; } > "$OUT/smoke.txt" 2>&1
tail -2 "$OUT/smoke.txt" | cut -c1-600

echo "== 3. parity $SECONDS"
cd "$G/parity" || exit 1
{
    timeout -k 10 "$(cap 90)" "$X" train run.toml --work-dir cuda --device cuda > cuda.log 2>&1
    echo "train rc $?"; tail -4 cuda.log
    # The bf16 losses must track the f32 ones: within 3% (relative) at every step.
    python3 - cpu/train_log.jsonl cuda/train_log.jsonl <<'PY'
import json, sys
def losses(path):
    try:
        return [r["loss"] for r in map(json.loads, open(path)) if r.get("event") == "step"]
    except OSError:
        return []
cpu, cuda = losses(sys.argv[1]), losses(sys.argv[2])
worst = max((abs(a - b) / abs(a) for a, b in zip(cpu, cuda)), default=float("inf"))
ok = len(cpu) == len(cuda) > 0 and worst < 0.03
print(f"parity {'PASS' if ok else 'FAIL'}: {len(cuda)}/{len(cpu)} steps, worst relative loss difference {worst:.4f}")
print("cpu ", " ".join(f"{x:.4f}" for x in cpu)); print("cuda", " ".join(f"{x:.4f}" for x in cuda))
PY
} > "$OUT/parity.txt" 2>&1
cd - > /dev/null || exit 1
grep -E "parity|rc" "$OUT/parity.txt"

echo "== 3b. NCCL $SECONDS"
{
    # Every collective against its known result, and a 100 MB all-reduce's time.
    timeout -k 5 "$(cap 30)" "$X" collective-check --device cuda --len 25000000
    echo "nccl 1 rank rc $?"
    version=$(grep -o 'through NCCL [0-9]*' "$OUT/nccl.txt" | awk '{print $3}')
    if [ "${version:-0}" -ge 23000 ]; then
        for rank in 0 1; do
            NCCL_MULTI_RANK_GPU_ENABLE=1 RANK=$rank WORLD_SIZE=2 LOCAL_RANK=0 \
                MASTER_ADDR=127.0.0.1 MASTER_PORT=29617 XTUNER_DIST_TIMEOUT=30 \
                timeout -k 5 "$(cap 40)" "$X" collective-check --device cuda --len 25000000 &
        done
        wait -n; a=$?; wait -n; b=$?
        echo "nccl 2 ranks on one GPU rc $a $b"
    else
        echo "NCCL ${version:-not loaded}: two ranks on one GPU need 2.30 or newer; skipped"
    fi
} > "$OUT/nccl.txt" 2>&1
grep -E "rc|ok|through|MB|skipped|error" "$OUT/nccl.txt" | head -12

LEFT=$((BUDGET - SECONDS))
echo "== 4. bench $SECONDS (left $LEFT)"
if [ "$LEFT" -gt 60 ]; then
    timeout -k 10 "$LEFT" "$G/xtask" bench train --xtuner "$X" --python /tmp/py3 \
        --modes lora,qlora,full --warmup 2 --steps 3 --timeout 130 \
        --out "$OUT/bench.md" 2> "$OUT/bench.err"
    echo "bench rc $?"
fi

echo "== 5. extras $SECONDS"
{
    for knob in XTUNER_GEMM=burn XTUNER_ATTENTION=dense; do
        LEFT=$((BUDGET - SECONDS))
        [ "$LEFT" -gt 40 ] || break
        echo "-- smoke with $knob"
        env "$knob" timeout -k 5 30 "$X" bench --device cuda --preset internlm2-tiny \
            --vocab-size 1000 --seq-len 256 --warmup 1 --steps 3 2>&1 | tail -1
    done
    if [ $((BUDGET - SECONDS)) -gt 40 ]; then
        echo "-- greedy chat on the parity model"
        (cd "$G/parity" && timeout -k 5 30 "$X" chat model --prompt "The highest " \
            --temperature 0 --max-new-tokens 8 --no-streamer --device cuda 2>&1 | tail -3)
    fi
    LEFT=$((BUDGET - SECONDS))
    if [ "$LEFT" -gt 60 ]; then
        echo "-- LoRA bench with materialised attention scores"
        XTUNER_ATTENTION=dense timeout -k 10 "$LEFT" "$G/xtask" bench train --xtuner "$X" \
            --no-reference --modes lora --warmup 2 --steps 3 --timeout 130 \
            --out /tmp/bench_dense.md 2>&1 | tail -3
        cat /tmp/bench_dense.md 2>/dev/null
    fi
} > "$OUT/extra.txt" 2>&1

echo "== summary $SECONDS"
grep -E "rc [0-9]+$" "$OUT/tests.txt" "$OUT/smoke.txt" "$OUT/parity.txt"
grep -E "rc [0-9 ]+$|skipped" "$OUT/nccl.txt"
grep -h "parity" "$OUT/parity.txt" | head -1
grep -E "^\|" "$OUT/bench.md" 2>/dev/null
