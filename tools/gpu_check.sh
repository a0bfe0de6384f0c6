#!/bin/bash
# Device checks for the CUDA path, run on a lent GPU machine with target/gpu carried
# (tools/gpu_bundle.sh makes it): the cuBLAS seam against Burn's matmul, the flash
# kernels against their reference, a smoke run with and without cuBLAS and flash attention, CPU-vs-CUDA losses on the tiny fixture, then `xtask bench train`
# against PyTorch. Results land in $OUT.
export CUDA_PATH=/usr/local/cuda
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
G=$PWD/target/gpu
X=$G/xtuner
tar xzf $G/bin.tar.gz -C $G
BUDGET=${BUDGET:-540}
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch,transformers,peft;print('torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__)"
python3 -c "import bitsandbytes as b;print('bitsandbytes',b.__version__)" 2>&1 | tail -1
nproc; date -u
} > $OUT/env.txt 2>&1
echo "== cuBLAS seam $SECONDS"
timeout 120 $G/cuda_gemm > $OUT/cuda_gemm.txt 2>&1; echo "rc $?"
tail -15 $OUT/cuda_gemm.txt
echo "== CubeCL kernels (flash attention, NF4) $SECONDS"
timeout 120 $G/cube_kernels > $OUT/cube_kernels.txt 2>&1; echo "rc $?"
tail -15 $OUT/cube_kernels.txt
echo "== smoke $SECONDS"
timeout 120 $X bench --device cuda --preset internlm2-tiny --vocab-size 1000 --seq-len 256 --warmup 1 --steps 3 > $OUT/smoke.json 2> $OUT/smoke.err; echo "rc $?"
tail -3 $OUT/smoke.err; cat $OUT/smoke.json
XTUNER_GEMM=burn timeout 120 $X bench --device cuda --preset internlm2-tiny --vocab-size 1000 --seq-len 256 --warmup 1 --steps 3 > $OUT/smoke_burn_gemm.json 2>&1; echo "rc $?"
tail -1 $OUT/smoke_burn_gemm.json
XTUNER_ATTENTION=dense timeout 120 $X bench --device cuda --preset internlm2-tiny --vocab-size 1000 --seq-len 256 --warmup 1 --steps 3 > $OUT/smoke_dense_attention.json 2>&1; echo "rc $?"
tail -1 $OUT/smoke_dense_attention.json
echo "== parity $SECONDS"
cd $G/parity
timeout 120 $X train run.toml --work-dir cuda --device cuda > $OUT/parity_cuda.out 2>&1; echo "rc $?"
tail -3 $OUT/parity_cuda.out
cp cpu/train_log.jsonl $OUT/parity_cpu.jsonl; cp cuda/train_log.jsonl $OUT/parity_cuda.jsonl 2>/dev/null
# The bf16 losses must track the f32 ones: within 3% (relative) at every step.
python3 - $OUT/parity_cpu.jsonl $OUT/parity_cuda.jsonl <<'PY'
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
timeout 60 $X chat model --prompt "The highest " --temperature 0 --max-new-tokens 8 --no-streamer --device cuda > $OUT/chat_cuda.txt 2>&1; echo "chat rc $?"; cat $OUT/chat_cuda.txt | tail -3
cd - > /dev/null
LEFT=$((BUDGET - SECONDS))
echo "== bench $SECONDS (left $LEFT)"
timeout $LEFT $G/xtask bench train --xtuner $X --modes lora,full,qlora --warmup 2 --steps 3 --timeout 130 --out $OUT/bench.md 2> $OUT/bench.err
echo "bench rc $?"
tail -30 $OUT/bench.err
LEFT=$((BUDGET - SECONDS))
if [ $LEFT -gt 60 ]; then
    echo "== LoRA with materialised attention scores $SECONDS (left $LEFT)"
    XTUNER_ATTENTION=dense timeout $LEFT $G/xtask bench train --xtuner $X --modes lora --warmup 2 --steps 3 --timeout 130 --out $OUT/bench_dense_attention.md 2> $OUT/bench_dense_attention.err
    echo "rc $?"; tail -5 $OUT/bench_dense_attention.err
fi
echo "== done $SECONDS"
