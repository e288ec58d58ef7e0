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
# Environment overrides: DATASET ARCH EPOCHS DATA_DIR DEVICE OUT (output folder), SEED; for tail also
# SWA_START and SWA_LR (0.05 or 0.10 in the paper).
# DATA_DIR holding train/ and test/ (or val/) class folders is read as an ImageFolder tree; otherwise
# CIFAR is downloaded into it.
set -euo pipefail
mode=${1:-quick}
cd "$(dirname "$0")"
DEVICE=${DEVICE:-auto}
SEED=${SEED:-1}

dataset_for() {  # $1: the dataset name used when DATA_DIR is not an ImageFolder tree
    if [ -n "${DATASET:-}" ]; then echo "$DATASET"
    elif [ -d "${DATA_DIR:-./datasets}/train" ]; then echo ImageFolder
    else echo "$1"; fi
}

case "$mode" in
quick)
    DATASET=$(dataset_for CIFAR10); ARCH=${ARCH:-resnet20}; EPOCHS=${EPOCHS:-6}
    OUT=${OUT:-results/runs/quick_${ARCH}_${DATASET}}
    common=(--datasets "$DATASET" --data-dir "${DATA_DIR:-./datasets}" --arch "$ARCH" --device "$DEVICE"
            --randomseed "$SEED" --train-subset 10000 --save-dir "$OUT/checkpoints" --log-dir "$OUT")
    python train_sgd.py "${common[@]}" --epochs "$EPOCHS" --lr 0.1 --wd 5e-4 --save-every 2
    # TWA over the first half of the checkpoints (0.pt .. EPOCHS.pt at 2 per epoch), 2 epochs
    python train_twa.py "${common[@]}" --epochs 2 --lr 0.5 --wd 1e-5 --schedule step \
        --params_start 0 --params_end $((EPOCHS + 1)) --train_start -1
    ;;
quick-online)
    DATASET=$(dataset_for CIFAR10); ARCH=${ARCH:-resnet20}; EPOCHS=${EPOCHS:-6}
    OUT=${OUT:-results/runs/quick_online_${ARCH}_${DATASET}}
    python train_sgd.py --datasets "$DATASET" --data-dir "${DATA_DIR:-./datasets}" --arch "$ARCH" \
        --device "$DEVICE" --randomseed "$SEED" --train-subset 10000 --save-dir "$OUT" \
        --epochs "$EPOCHS" --lr 0.1 --wd 5e-4 --twa-at $((EPOCHS / 2)) --record-every 2 \
        --twa-epochs 2 --twa-lr 0.5 --twa-wd 1e-5 --twa-schedule step
    ;;
cifar)
    DATASET=$(dataset_for CIFAR100); ARCH=${ARCH:-VGG16BN}; EPOCHS=${EPOCHS:-200}
    OUT=${OUT:-results/runs/${ARCH}_${DATASET}}
    common=(--datasets "$DATASET" --data-dir "${DATA_DIR:-./datasets}" --arch "$ARCH" --device "$DEVICE"
            --randomseed "$SEED" --save-dir "$OUT/checkpoints" --log-dir "$OUT")
    python train_sgd.py "${common[@]}" --epochs "$EPOCHS" --lr 0.1 -p 100
    python train_twa.py "${common[@]}" --epochs 10 --opt SGD --extract Schmidt --schedule step \
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
    common=(--datasets "$DATASET" --data-dir "${DATA_DIR:-./datasets}" --arch "$ARCH" --device "$DEVICE"
            --randomseed "$SEED" --save-dir "$OUT/checkpoints" --log-dir "$OUT")
    python train_sgd.py "${common[@]}" --epochs "$EPOCHS" --lr 0.1 --wd "$WD" -p 100 \
        --schedule swa --swa-start "$SWA_START" --swa-lr "$SWA_LR"
    # SWA and TWA over checkpoints SWA_START..EPOCHS (one per epoch), TWA from the last one
    python train_twa.py "${common[@]}" --epochs 10 --opt SGD --extract Schmidt --schedule step \
        --lr 2 --wd 0.00005 --params_start "$SWA_START" --params_end $((EPOCHS + 1)) \
        --train_start "$EPOCHS" --batch-size 128
    ;;
imagenet)
    DATASET=${DATASET:-ImageNet}; ARCH=${ARCH:-resnet18}; EPOCHS=${EPOCHS:-90}
    OUT=${OUT:-results/runs/${ARCH}_${DATASET}}
    common=(--datasets "$DATASET" --data-dir "${DATA_DIR:?set DATA_DIR to the ImageNet tree}"
            --arch "$ARCH" --device "$DEVICE" --randomseed "$SEED" --workers 8
            --save-dir "$OUT/checkpoints" --log-dir "$OUT")
    python train_sgd.py "${common[@]}" --epochs "$EPOCHS" --lr 0.1 --wd 1e-4 -b 256 --save-every 5
    # TWA over the first 60 epochs (5 checkpoints per epoch: 0.pt .. 300.pt), 2 epochs
    python train_twa.py "${common[@]}" --epochs 2 --opt SGD --extract Schmidt --schedule step \
        --lr 0.3 --params_start 0 --params_end 301 --train_start -1 --wd 0.00001 -b 256
    ;;
*)
    echo "usage: bash run.sh [quick|quick-online|cifar|tail|imagenet]" >&2; exit 2 ;;
esac
