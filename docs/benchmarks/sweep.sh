#!/usr/bin/env bash
# The H200 check-and-benchmark sweep behind docs/benchmarks: every GPU check and suite of the
# open issues, as the `python -m attngen` commands a user would type, on a host with 2 GPUs.
#
#   bash docs/benchmarks/sweep.sh RESULTS_DIR
#
# GPU 0 runs the benchmarks one after another (nothing else on that GPU while they time);
# GPU 1 runs the correctness checks meanwhile (fault replays, zoo, the test suite, the fuzzer).
# Every step writes RESULTS_DIR/<step>.log (and its suite's .json/.md/.png); RESULTS_DIR/steps.log
# has each step's start, exit status and seconds; RESULTS_DIR/done appears at the end.
# On a one-GPU host set LANES=1 to run both lanes on GPU 0, one after the other.
set -u
R=${1:?usage: sweep.sh RESULTS_DIR}
mkdir -p "$R"
R=$(cd "$R" && pwd)
export PYTHONUNBUFFERED=1 ATTNGEN_CACHE_DIR="$R/cache"
# no NVLink multicast on shared hosts (see the device notes)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}

step() {  # step NAME COMMAND...: run, log output and timing, never stop the sweep
    local name=$1 start rc
    shift
    start=$(date +%s)
    echo "$(date +%T) start $name: $*" >>"$R/steps.log"
    "$@" >"$R/$name.log" 2>&1
    rc=$?
    echo "$(date +%T) end $name rc=$rc $(($(date +%s) - start))s" >>"$R/steps.log"
}

replays() {  # the GPU fault cases of tests/regressions, each in a fresh process, at head-dim floors 32 (default) and 16
    local dir="$R/replays" f floor
    mkdir -p "$dir"
    $PY - "$dir" <<'EOF'
import sys, yaml
sys.path.insert(0, "tests/regressions")
from test_gpu_fuzz_faults import CASES
for name, case in CASES.items():
    open(f"{sys.argv[1]}/{name}.yaml", "w").write(yaml.safe_dump(case, sort_keys=False))
EOF
    for floor in 32 16; do
        for f in "$dir"/*.yaml; do
            (ATTNGEN_MIN_HEAD_BLOCK=$floor CUDA_LAUNCH_BLOCKING=1 $PY -m attngen fuzz --replay "$f" --device cuda \
                >"$f.floor$floor.log" 2>&1; echo "floor $floor $(basename "$f" .yaml) rc=$?") &
        done
        wait
    done
}

correctness() {
    step replays replays
    step zoo $PY -m attngen zoo --shape 2,8,2,1000,128 --dims 128 80 64 --jobs 12
    # one new token per sequence for the normalisers without a softmax (T = 1)
    step zoo_t1 $PY -m attngen zoo --spec linear_elu linear_relu based_taylor performer sigmoid_causal --shape 2,8,2,1,128 --dims 128 80 64 --dtype bf16 fp32 --jobs 12
    step pytest $PY -m pytest -q -n 8 -p no:cacheprovider tests
    step fuzz $PY -m attngen fuzz --random --examples 2000 --jobs 14 --device cuda --seed 0
}

benchmarks() {
    step decode $PY -m attngen bench --suite decode --out "$R"
    step recompute $PY -m attngen bench --suite recompute --out "$R"
    step sigmoid $PY -m attngen bench --suite sigmoid --out "$R"
    # the issue's shape (B=1, H=16, T=16384, D=128) next to the suite's, and one other block shape
    step linear $PY -m attngen bench --suite linear --seqs 2048 8192 16384 --blocks 32x32 --out "$R"
    step llama $PY -m attngen bench --suite llama --out "$R"
    step sparse $PY -m attngen bench --suite sparse --out "$R" --name sparse
    step tune $PY -m attngen tune causal --gpu-shapes 1,16,16,16384,128
    step tune_again $PY -m attngen tune causal --gpu-shapes 1,16,16,16384,128
    step long $PY -m attngen bench --suite long
    step anchors $PY -m attngen bench --suite anchors --name h200 --out "$R" --warm-jobs 8
}

if [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && [ "${LANES:-2}" = 2 ]; then
    step ring $PY -m attngen bench --suite ring --gpus 2 --seqs 262144 --out "$R"
    (export CUDA_VISIBLE_DEVICES=1; correctness) &
    (export CUDA_VISIBLE_DEVICES=0; benchmarks) &
    wait
else
    benchmarks
    correctness
fi
touch "$R/done"
