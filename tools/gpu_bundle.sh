#!/bin/bash
# Prepares target/gpu/ for a lent GPU machine (see docs/BENCHMARKS.md, "Training on a
# GPU"): the CUDA release build of xtuner, the cuBLAS seam's and CubeCL kernels' tests
# and the xtask binary,
# stripped (the carry limit is 64 MiB), and the CPU side of the parity check on the tiny
# fixture.
# Run from the repository root; ../shared/fixtures must be beside the clone.
# Then, on the machine: `BUDGET=470 bash tools/gpu_check.sh` with `target/gpu` carried.
set -euo pipefail
CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda cargo build --release -p xtuner-cli --features cuda
test_binary() {
    CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda cargo test --release -p xtuner-model --features cuda --test "$1" --no-run --message-format=json \
        | python3 -c 'import json,sys;print([m["executable"] for m in map(json.loads,sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable")][-1])'
}
gemm_test=$(test_binary cuda_gemm)
flash_test=$(test_binary cube_kernels)
cargo build --release -p xtask -p xtuner-cli
G=target/gpu
rm -rf "$G" && mkdir -p "$G/parity/model"
strip -o "$G/xtuner" target/cuda/release/xtuner
strip -o "$G/xtask" target/release/xtask
strip -o "$G/cuda_gemm" "$gemm_test"
strip -o "$G/cube_kernels" "$flash_test"
# Stripped, the four are ~100 MB; gzipped, ~25 MB. gpu_check.sh unpacks them.
tar czf "$G/bin.tar.gz" -C "$G" xtuner xtask cuda_gemm cube_kernels
rm "$G/xtuner" "$G/xtask" "$G/cuda_gemm" "$G/cube_kernels"
# What the binaries were built from (gpu_check.sh prints it); "+dirty" if uncommitted.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates xtask Cargo.toml Cargo.lock || echo +dirty)" > "$G/commit.txt"
cp ../shared/fixtures/internlm2-tiny/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json} "$G/parity/model/"
python3 - "$G/parity" <<'PY'
import json, sys
d = sys.argv[1]
json.dump([{"instruction": f"Say {i}.", "input": "", "output": f"{i} {i} {i}"} for i in range(24)], open(f"{d}/data.json", "w"))
open(f"{d}/run.toml", "w").write("""[model]
path = "model"
[data]
files = ["data.json"]
format = "alpaca"
max_length = 48
[template]
name = "internlm2_chat"
[lora]
r = 4
alpha = 8
dropout = 0.0
[optimizer]
lr = 1e-3
[train]
batch_size = 2
accumulative_counts = 1
max_iters = 12
[checkpoint]
save_steps = 100
[evaluation]
inputs = []
""")
PY
(cd "$G/parity" && ../../release/xtuner train run.toml --work-dir cpu >/dev/null && rm -rf cpu/iter_* cpu/base_model)
du -sh "$G"
