#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the CUDA tests, the I/O benchmark with
# tensors on the GPU (GPU Direct Storage included), the training-step benchmark on
# a 12-layer GPT, and the largest micro-batch with and without offloading.
#
# Those machines have torch with CUDA but no network, so build the wheel first and
# carry it (from the repository root, here):
#     python -m build --wheel --outdir .whl      # .whl/ is git-ignored
# then there:
#     bash benchmarks/gpu_check.sh               # logs and JSON under $OUT
#
# Each stage has its own time limit, so one that runs long leaves the others their
# time; every stage's output goes to $OUT/gpu_check.log as it runs.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD  # tests and benchmarks alike run this tree, not a stale wheel

# The offload directory: the first candidate on a real disk (not tmpfs or ramfs).
for d in ${FXOFFLOAD_DIR:-} /var/tmp /tmp "$PWD"; do
    case "$(stat -f -c %T "$d" 2>/dev/null)" in
        "" | tmpfs | ramfs) ;;
        *) DIR="$d/fxoffload-gpu" && break ;;
    esac
done
mkdir -p "$DIR"

FAILED=()
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2 status
    shift 2
    echo "=== $name (limit ${limit} s) at $(date +%T)" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    echo "=== $name: exit $status at $(date +%T)" | tee -a "$LOG"
    [ "$status" = 0 ] || FAILED+=("$name")
}

GPT=(--device cuda --autocast --layers 12 --width 2048 --heads 16 --seq-len 1024
     --offload-dir "$DIR")

stage env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
    python -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())';
    nproc; free -g | head -2; df -h '$DIR'; findmnt -T '$DIR' || true"
stage install 60 bash -c 'if ls .whl/fxoffload-*.whl >/dev/null 2>&1; then
        python -m pip install -q --no-deps --no-index --force-reinstall .whl/fxoffload-*.whl;
    else python -m pip install -q --no-deps --no-build-isolation .; fi'
stage tests 100 python -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py
stage io 45 python benchmarks/io_bandwidth.py --dir "$DIR" --device cuda --no-step \
    --total-mib 256 --repeats 2  # each size twice (new and pooled engine): 256 MiB fits 45 s
stage train 200 python benchmarks/train_step.py "${GPT[@]}" --batch 8 --steps 5 \
    --configs none,adaptive,recompute,budget-0.5 --json "$OUT/train_step.json"
stage max-batch 140 python benchmarks/train_step.py "${GPT[@]}" --batch 8 --steps 3 \
    --configs none,adaptive --max-batch --memory-limit-gib 40 --json "$OUT/max_batch.json"

if [ ${#FAILED[@]} -gt 0 ]; then  # the run's exit status says it: a log is easy to misread
    echo "=== failed stages: ${FAILED[*]}" | tee -a "$LOG"
    exit 1
fi
