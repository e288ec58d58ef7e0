#!/usr/bin/env bash
# TWA pipelines: regular SGD training that saves checkpoints, then TWA over them.
#
#   bash run.sh quick      a few minutes on a CPU: ResNet-20, 10k CIFAR-10 images, 6 SGD epochs
#   bash run.sh quick-online   the same TWA in one command: SGD stops at epoch 3, its weights recorded
#                          in memory (no checkpoint files), then SWA and TWA in the same process
#   bash run.sh cifar      the paper's CIFAR-100 VGG16BN run: 200 SGD epochs, TWA over 0..100
#   bash run.sh tail       the paper's tail stage (the reference's swa/ scripts): SWA-schedule training,
#                          then SWA and TWA over the tail checkpoints, TWA from the last one
#   bash run.sh imagenet   the paper's ImageNet ResNet-18 run: 90 epochs, TWA over 0..300
#
# Environment overrides: DATASET ARCH EPOCHS DATA_DIR DEVICE OUT (output folder), SEED; for quick also
# SUBSET (training images, default 10000; 0: all); for tail also
# SWA_START and SWA_LR (0.05 or 0.10 in the paper).
# DATA_DIR holding train/ and test/ (or val/) class folders is read as an ImageFolder tree; otherwise
# CIFAR is downloaded into it (default ./datasets).
# A second call finds the first one's OUT: RESUME=1 continues it (an interrupted run goes on, a
# finished one trains nothing more and writes its results again), FRESH=1 removes it and starts again.
set -euo pipefail
mode=${1:-quick}
cd "$(dirname "$0")"
DEVICE=${DEVICE:-auto}
SEED=${SEED:-1}

say() { echo "[run.sh $(date +%H:%M:%S)] $*"; }

prepare_out() {  # an earlier run's folder: continue it, replace it, or stop and name the knobs
    resume=()
    for knob in EPOCHS SEED SUBSET SWA_START; do  # the counts run.sh computes with
        if [ -n "${!knob:-}" ] && ! [[ "${!knob}" =~ ^[0-9]+$ ]]; then
            echo "run.sh: $knob=${!knob} is not a whole number" >&2; exit 2
        fi
    done
    if [ "${RESUME:-0}" = 1 ] && [ "${FRESH:-0}" = 1 ]; then
        echo "run.sh: RESUME=1 continues the earlier run and FRESH=1 removes it: set one" >&2; exit 2
    fi
    [ -e "$OUT" ] || return 0
    # a run that stopped before its first checkpoint (no data, say) left nothing to continue
    compgen -G "$OUT/*.pt" > /dev/null || compgen -G "$OUT/checkpoints/*.pt" > /dev/null || return 0
    if [ "${RESUME:-0}" = 1 ]; then resume=(--resume); return 0; fi
    if [ "${FRESH:-0}" = 1 ]; then
        if [ -f "$OUT/metrics.jsonl" ] || [ -f "$OUT/checkpoints/checkpoints.json" ] || [ -f "$OUT/sgd_args.json" ]; then
            say "FRESH=1: removing $OUT"; rm -rf -- "$OUT"; return 0
        fi
        echo "run.sh: FRESH=1 removes only a folder these scripts wrote, and $OUT is not one" >&2; exit 2
    fi
    echo "run.sh: $OUT holds an earlier run: RESUME=1 bash run.sh $mode continues it," \
         "FRESH=1 bash run.sh $mode starts it again, OUT=<folder> bash run.sh $mode writes elsewhere" \
         "(each with the same DATA_DIR and other settings as before)" >&2
    exit 2
}

dataset_for() {  # $1: the dataset name used when DATA_DIR is not an ImageFolder tree
    if [ -n "${DATASET:-}" ]; then echo "$DATASET"
    elif [ -d "${DATA_DIR:-./datasets}/train" ]; then echo ImageFolder
    else echo "$1"; fi
}

case "$mode" in
quick)
    DATASET=$(dataset_for CIFAR10); ARCH=${ARCH:-resnet20}; EPOCHS=${EPOCHS:-6}; SUBSET=${SUBSET:-10000}
    OUT=${OUT:-results/runs/quick_${ARCH}_${DATASET}}
    prepare_out
    common=(--datasets "$DATASET" --data-dir "${DATA_DIR:-./datasets}" --arch "$ARCH" --device "$DEVICE"
            --randomseed "$SEED" --train-subset "$SUBSET" --save-dir "$OUT/checkpoints" --log-dir "$OUT")
    say "1/2 SGD: $ARCH, $EPOCHS epochs on ${SUBSET} $DATASET images, 2 checkpoints per epoch, into $OUT" \
        "(its first line comes once torch is loaded and the images are decoded, 10-30 s)"
    python train_sgd.py "${common[@]}" --epochs "$EPOCHS" --lr 0.1 --wd 5e-4 --save-every 2 "${resume[@]}"
    # TWA over the first half of the checkpoints (0.pt .. EPOCHS.pt at 2 per epoch), 2 epochs
    say "2/2 SWA and TWA over checkpoints 0..$EPOCHS (the first $((EPOCHS / 2)) epochs), 2 TWA epochs"
    python train_twa.py "${common[@]}" --epochs 2 --lr 0.5 --wd 1e-5 --schedule step \
        --params_start 0 --params_end $((EPOCHS + 1)) --train_start -1 "${resume[@]}"
    say "done: $OUT/twa_results.json; draw it with python plot.py curves $OUT -o curves.png"
    ;;
quick-online)
    DATASET=$(dataset_for CIFAR10); ARCH=${ARCH:-resnet20}; EPOCHS=${EPOCHS:-6}; SUBSET=${SUBSET:-10000}
    OUT=${OUT:-results/runs/quick_online_${ARCH}_${DATASET}}
    prepare_out
    say "SGD for $EPOCHS epochs, recording its weights from the start; at epoch $((EPOCHS / 2)) SWA and TWA" \
        "over them, in one process, into $OUT"
    python train_sgd.py "${resume[@]}" --datasets "$DATASET" --data-dir "${DATA_DIR:-./datasets}" --arch "$ARCH" \
        --device "$DEVICE" --randomseed "$SEED" --train-subset "$SUBSET" --save-dir "$OUT" \
        --epochs "$EPOCHS" --lr 0.1 --wd 5e-4 --twa-at $((EPOCHS / 2)) --record-every 2 \
        --twa-epochs 2 --twa-lr 0.5 --twa-wd 1e-5 --twa-schedule step
    ;;
cifar)
    DATASET=$(dataset_for CIFAR100); ARCH=${ARCH:-VGG16BN}; EPOCHS=${EPOCHS:-200}
    OUT=${OUT:-results/runs/${ARCH}_${DATASET}}
    prepare_out
    common=(--datasets "$DATASET" --data-dir "${DATA_DIR:-./datasets}" --arch "$ARCH" --device "$DEVICE"
            --randomseed "$SEED" --save-dir "$OUT/checkpoints" --log-dir "$OUT")
    say "1/2 SGD: $ARCH on $DATASET, $EPOCHS epochs, into $OUT"
    python train_sgd.py "${common[@]}" --epochs "$EPOCHS" --lr 0.1 -p 100 "${resume[@]}"
    say "2/2 SWA and TWA over checkpoints 0..$((EPOCHS / 2)), 10 TWA epochs"
    python train_twa.py "${common[@]}" "${resume[@]}" --epochs 10 --opt SGD --extract Schmidt --schedule step \
        --lr 2 --params_start 0 --params_end $((EPOCHS / 2 + 1)) --train_start -1 --wd 0.00001 \
        --batch-size 128
    ;;
tail)
    DATASET=$(dataset_for CIFAR100); ARCH=${ARCH:-VGG16BN}; SWA_LR=${SWA_LR:-0.05}
    if [ "$ARCH" = PreResNet164 ]; then  # the reference's budgets: 1.5x the usual SWA run
        EPOCHS=${EPOCHS:-225}; SWA_START=${SWA_START:-126}; WD=3e-4
    else
        EPOCHS=${EPOCHS:-300}; SWA_START=${SWA_START:-161}; WD=5e-4
    fi
    OUT=${OUT:-results/runs/tail_${ARCH}_${DATASET}_swalr${SWA_LR}}
    prepare_out
    common=(--datasets "$DATASET" --data-dir "${DATA_DIR:-./datasets}" --arch "$ARCH" --device "$DEVICE"
            --randomseed "$SEED" --save-dir "$OUT/checkpoints" --log-dir "$OUT")
    say "1/2 SGD with the SWA schedule: $ARCH on $DATASET, $EPOCHS epochs, swa_lr $SWA_LR from $SWA_START, into $OUT"
    python train_sgd.py "${common[@]}" "${resume[@]}" --epochs "$EPOCHS" --lr 0.1 --wd "$WD" -p 100 \
        --schedule swa --swa-start "$SWA_START" --swa-lr "$SWA_LR"
    # SWA and TWA over checkpoints SWA_START..EPOCHS (one per epoch), TWA from the last one
    say "2/2 SWA and TWA over checkpoints $SWA_START..$EPOCHS, TWA from the last one"
    python train_twa.py "${common[@]}" "${resume[@]}" --epochs 10 --opt SGD --extract Schmidt --schedule step \
        --lr 2 --wd 0.00005 --params_start "$SWA_START" --params_end $((EPOCHS + 1)) \
        --train_start "$EPOCHS" --batch-size 128
    ;;
imagenet)
    DATASET=${DATASET:-ImageNet}; ARCH=${ARCH:-resnet18}; EPOCHS=${EPOCHS:-90}
    OUT=${OUT:-results/runs/${ARCH}_${DATASET}}
    prepare_out
    common=(--datasets "$DATASET" --data-dir "${DATA_DIR:?set DATA_DIR to the ImageNet tree}"
            --arch "$ARCH" --device "$DEVICE" --randomseed "$SEED" --workers 8
            --save-dir "$OUT/checkpoints" --log-dir "$OUT")
    say "1/2 SGD: $ARCH on ImageNet, $EPOCHS epochs, 5 checkpoints per epoch, into $OUT"
    python train_sgd.py "${common[@]}" "${resume[@]}" --epochs "$EPOCHS" --lr 0.1 --wd 1e-4 -b 256 --save-every 5
    # TWA over the first 60 epochs (5 checkpoints per epoch: 0.pt .. 300.pt), 2 epochs
    say "2/2 SWA and TWA over checkpoints 0..300 (the first 60 epochs), 2 TWA epochs"
    python train_twa.py "${common[@]}" "${resume[@]}" --epochs 2 --opt SGD --extract Schmidt --schedule step \
        --lr 0.3 --params_start 0 --params_end 301 --train_start -1 --wd 0.00001 -b 256
    ;;
*)
    echo "usage: bash run.sh [quick|quick-online|cifar|tail|imagenet]" >&2; exit 2 ;;
esac
