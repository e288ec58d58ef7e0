#!/usr/bin/env bash
# One prepared device session for the GPU path, in the order of what matters most:
#   1. the machine (GPU, torch, CUDA) and the tests that need a GPU (pytest -m cuda);
#   2. seconds per CIFAR-10 epoch of ResNet-20 (batch 128), one process, eager / AMP / compiled /
#      compiled and captured with CUDA graphs; then a TWA epoch on that run's checkpoints at 32 and
#      8 bits, eager and captured (train_twa.py);
#   3. the TWA / SGD step ratio: ResNet-20 with n = 61 and ResNet-18 (ImageNet shapes, random
#      data) with n = 301, at 32 and 8 bits, and the projection against its bandwidth floor;
#   4. training images/s of ResNet-20 and VGG16BN: eager, compiled, AMP on and off;
#   5. with whatever time is left, the paper-scale reproduction (bench/reproduce.py --epochs 200).
# Each step runs under `timeout` within the budget; a step that would start with too little time
# left is skipped and says so. Everything goes under one results folder (--out), which is what
# comes back from the device.
#
#   bash bench/gpu.sh [--budget SECONDS] [--out DIR] [--data-dir DIR] [--dry-run]
#
# --data-dir: the CIFAR-10 ImageFolder tree (default: extracted from ../shared/data once).
# --dry-run: every step on the CPU at tiny sizes, to check this script itself (a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

budget=480
out=bench/results/gpu
data=""
dry=0
while (($#)); do
    case "$1" in
        --budget) budget=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --data-dir) data=$2; shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
python=${PYTHON:-python}
started=$(date +%s)
left() { echo $((budget - ($(date +%s) - started))); }

# run NAME MIN_SECONDS MAX_SECONDS COMMAND...: COMMAND's output goes to $out/NAME.txt
run() {
    local name=$1 need=$2 most=$3
    shift 3
    local remaining
    remaining=$(left)
    if ((remaining < need)); then
        echo "skipped $name: ${remaining} s left, it needs ${need} s" | tee -a "$out/summary.txt"
        return 0
    fi
    local limit=$((most < remaining ? most : remaining))
    local t0=$(date +%s) status=0
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1 || status=$?
    echo "$name: exit $status after $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$out/summary.txt"
}

if ((dry)); then
    device=cpu
    tests=(-m cuda tests/test_device.py)
    archs=(resnet20)
    steps=(--steps 2 --rounds 1)
    epoch_flags=(--train-subset 512 --epochs 1 --eval-every 1)
    twa_flags=(--train-subset 512 --epochs 1)
    step_flags=(--quick --rounds 1 --device cpu)
    reproduce=""
else
    device=cuda
    tests=(-m cuda tests)
    archs=(resnet20 VGG16BN)
    steps=(--steps 50 --rounds 3)
    epoch_flags=(--epochs 2 --eval-every 2)
    twa_flags=(--epochs 2 --eval-every 2)
    step_flags=(--rounds 5 --device cuda --gpu-cases)
    reproduce=1
fi
: >"$out/summary.txt"
if [[ -z "$data" ]]; then  # the steps that need CIFAR-10 are skipped without it
    data=$($python -c "import sys; sys.path.insert(0, 'bench'); import common; print(common.cifar10_dir())" \
        2>/dev/null) || { echo "no CIFAR-10 tree: give --data-dir" | tee -a "$out/summary.txt"; data=""; }
fi

run machine 5 60 bash -c "nvidia-smi || true; $python -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())'"
run tests 60 240 $python -m pytest -q "${tests[@]}"
tag() { echo "${1//--/}" | tr ' ' '-'; }  # "--amp --compile" -> "amp-compile"
for mode in "" "--amp" "--compile" "--compile --cuda-graphs" "--amp --compile --cuda-graphs"; do
    [[ -n "$data" ]] || break
    name=epoch-resnet20${mode:+-$(tag "$mode")}
    run "$name" 30 150 $python train_sgd.py --datasets ImageFolder --data-dir "$data" --arch resnet20 \
        -b 128 --device "$device" --save-dir "$out/$name" --save-every 1 --quiet "${epoch_flags[@]}" $mode
done
for mode in "--bits 32" "--bits 8" "--bits 32 --compile --cuda-graphs" "--bits 8 --compile --cuda-graphs"; do
    [[ -f "$out/epoch-resnet20/1.pt" ]] || break  # the eager SGD run's checkpoints 0.pt, 1.pt, ...
    name=twa-epoch-resnet20-$(tag "$mode")
    run "$name" 30 150 $python train_twa.py --datasets ImageFolder --data-dir "$data" --arch resnet20 \
        -b 128 --device "$device" --save-dir "$out/epoch-resnet20" --params_start 0 --params_end 2 \
        --output-dir "$out/$name" --log-dir "$out/$name" --quiet "${twa_flags[@]}" $mode
done
run step 30 180 $python bench/step.py "${step_flags[@]}"
for mode in "" "--amp" "--compile" "--amp --compile"; do
    [[ -n "$data" ]] || break
    name=throughput${mode:+-$(tag "$mode")}
    run "$name" 30 150 $python bench/throughput.py --device "$device" --archs "${archs[@]}" \
        "${steps[@]}" --data-dir "$data" $mode
done
if [[ -n "$reproduce" && -n "$data" ]]; then
    run reproduce 120 100000 $python bench/reproduce.py --seed 1 --epochs 200 --device cuda \
        --out "$out/runs" --results "$out" --data-dir "$data"
else
    echo "reproduce: not run in a dry run (on the device: bench/reproduce.py --seed 1 --epochs 200)" \
        | tee -a "$out/summary.txt"
fi
# seconds per epoch, from the runs' own metrics: the last epoch (the first pays for warm-up)
for file in "$out"/epoch-*/metrics.jsonl "$out"/twa-epoch-*/metrics.jsonl; do
    [[ -f "$file" ]] && echo "$(basename "$(dirname "$file")"): $(tail -n 1 "$file")" >>"$out/summary.txt"
done
echo "done in $(($(date +%s) - started)) s of $budget; results in $out" | tee -a "$out/summary.txt"
