#!/usr/bin/env bash
# The paper-scale head on one GPU, as one prepared command that fits a device call's limit: ResNet-20
# on CIFAR-10, E = 200 (lr 0.1, wd 1e-4, /10 at epochs 100 and 150), 1 checkpoint per epoch, TWA from
# the mean of the checkpoints of epochs 0..100 for 10 epochs (lr 2, 0.2, 0.02; wd 1e-5), BatchNorm
# recomputed and running; the seeds side by side (a small model leaves the GPU mostly idle). Each
# seed is `bench/head.py --twa-during-sgd`: its TWA starts beside its SGD once epoch 100 is written.
#
#   bash bench/gpu_head.sh --archive FILE | --data-dir DIR  [--out DIR] [--budget SECONDS]
#                          [--seeds "1 2 3"] [--state FILE] [--dry-run]
#
# --archive: cifar10-jpeg.tar.gz (../shared/data's), extracted here; --data-dir: an extracted tree.
# --budget (default 540): 60 seconds before it ends, every run gets SIGTERM, saves its state and
#   stops; what finished is in the results.
# --out gets at most 8 files, as a device call brings back: head-paper-e200-seed<K>.json per seed
#   (every scored model with its per-image results, the commands, the revision; rewritten after
#   every step, "complete" false where the budget ran out), log.txt, summary.txt and state.tar.gz
#   (each seed's SGD state, metrics and finished TWA results, without the checkpoints).
# --state: a state.tar.gz from an earlier call: the seeds whose TWA had finished continue their SGD
#   from it; the others start again (their checkpoints, which TWA needs, did not come back).
# --dry-run: on the CPU at tiny sizes (E = 4, 256 images), to check this script; --seeds defaults
#   to "1 2" then, and --out to /tmp/twa-gpu-head-dry (else to bench/results/gpu-head).
set -euo pipefail
cd "$(dirname "$0")/.."

budget=540
margin=60
out=""
archive=""
data=""
state=""
seeds=""
dry=0
while (($#)); do
    [[ "$1" == --dry-run || "$1" == -h || "$1" == --help || $# -ge 2 ]] ||
        { echo "error: $1 needs a value (see --help)" >&2; exit 2; }
    case "$1" in
        --budget) budget=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --archive) archive=$2; shift 2 ;;
        --data-dir) data=$2; shift 2 ;;
        --state) state=$2; shift 2 ;;
        --seeds) seeds=$2; shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
started=$(date +%s)
fail() { echo "error: $*" >&2; exit 2; }
[[ -n "$archive" || -n "$data" ]] || fail "give --archive FILE or --data-dir DIR"
[[ -z "$archive" || -f "$archive" ]] || fail "--archive $archive: no such file"
[[ -z "$state" || -f "$state" ]] || fail "--state $state: no such file"
[[ "$budget" =~ ^[0-9]+$ ]] && ((budget > margin)) || fail "--budget must be a whole number of seconds over $margin"
python=${PYTHON:-python3}
if ((dry)); then
    out=${out:-/tmp/twa-gpu-head-dry} seeds=${seeds:-1 2}
else
    out=${out:-bench/results/gpu-head} seeds=${seeds:-1 2 3}
fi
name=head-paper-e200
mkdir -p "$out"
exec 9<"$out"  # a lock on the folder itself (a lock file would be one more file to bring back)
flock -n 9 || fail "--out $out is in use by another gpu_head.sh"
# what would stop every seed within seconds, found before any long work: no torch, and (on the
# device) a tree whose revision the runners refuse
$python -c "import torch" 2>/dev/null || fail "$python cannot import torch (set PYTHON)"
revision=$($python -c "import runfiles; print(runfiles.git_revision())")
((dry)) || [[ "$revision" =~ ^[0-9a-f]{40}$ ]] ||
    fail "the tree is at revision '$revision': the runners need a clean git checkout; commit first"
ls "$out/$name"-seed*.json >/dev/null 2>&1 &&
    fail "--out $out holds results of an earlier call already: give an empty folder (and --state to continue)"
work=$(mktemp -d /tmp/twa-gpu-head.XXXXXX)
trap 'rm -rf "$work"' EXIT
runs=$work/runs
mkdir -p "$out" "$runs"
: >"$out/summary.txt"
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$out/summary.txt"; }

if [[ -n "$archive" ]]; then
    mkdir -p "$work/data"
    tar -xzf "$archive" -C "$work/data"
    data=$work/data
fi
[[ -d "$data/train" ]] || fail "--data-dir $data: no train/ folder there"
if [[ -n "$state" ]]; then  # a seed continues where its TWA had finished, else starts again
    mkdir -p "$work/restored"
    tar -xzf "$state" -C "$work/restored"
    for seed in $seeds; do
        record=$work/restored/results/$name-seed$seed.json
        started_at=$([[ -f "$record" ]] && $python -c "import json, sys; print(json.load(open(sys.argv[1]))['git'])" "$record" || true)
        [[ -z "$started_at" || "$started_at" == "$revision" ]] ||
            fail "$state holds seed $seed's run from revision $started_at, this tree is $revision: check that revision out first (git checkout $started_at)"
        if [[ -f "$record" ]] && $python -c "import json, sys; sys.exit(not json.load(open(sys.argv[1]))['head'])" "$record"; then
            cp "$record" "$out/"
            mv "$work/restored/runs/$name-seed$seed" "$runs/"
        else
            echo "seed $seed: no finished TWA in $state; it starts again (its checkpoints did not come back)" \
                | tee -a "$out/summary.txt"
        fi
    done
fi

if ((dry)); then
    flags=(--epochs 4 --twa-end 2 --twa-epochs 1 --train-subset 256 -b 32 --device cpu --allow-dirty)
else
    flags=(--epochs 200 --twa-epochs 10 --device cuda)
fi
say "$($python -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())')"
limit=$((budget - margin - ($(date +%s) - started)))
((limit >= 60)) || fail "the set-up took the budget: $limit s would be left for the runs"
say "seeds $seeds, $limit s until SIGTERM"
pids=()
for seed in $seeds; do
    # --foreground: the SIGTERM goes to head.py alone, which passes it on to its scripts once each (a
    # second would stop them unsaved); --kill-after: a head.py not ended 40 s later is killed
    timeout --foreground --kill-after=40 "$limit" $python bench/head.py --seed "$seed" --per-epoch 1 \
        --twa-per-epoch 1 --twa-during-sgd --name "$name" --data-dir "$data" --out "$runs" \
        --results "$out" "${flags[@]}" >"$runs/seed$seed.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
# scripts that outlived a killed head.py (each names $runs in its command line): their last saved
# state is what they leave, and nothing writes while it is packed
pkill -KILL -f -- "$runs" || true
say "runs ended (last non-zero exit: $status)"
for seed in $seeds; do
    echo "== seed $seed" >>"$out/log.txt"
    cat "$runs/seed$seed.log" >>"$out/log.txt"
done
# what continues the runs next time: the records, and the run folders but for the checkpoints and
# TWA's weights
mkdir -p "$work/results"
cp "$out/$name"-seed*.json "$work/results/" 2>/dev/null || true
(cd "$work" && find runs results -type f \( ! -name '*.pt' -o -name state.pt -o -name twa_state.pt \) \
    -print0 | tar --null -czf state.tar.gz -T -) || say "packing the state: tar exited with $?"
[[ ! -f "$work/state.tar.gz" ]] || mv "$work/state.tar.gz" "$out/state.tar.gz"
for file in "$out/$name"-seed*.json; do
    [[ -f "$file" ]] && say "$(basename "$file"): $($python -c "
import json, sys
r = json.load(open(sys.argv[1]))
twa = [(h['name'], h['twa']['recompute']['accuracy']) for h in r['head']]
print(f\"complete {r['complete']}, SGD epochs {len(r.get('sgd', {}).get('test_acc', []))}, TWA {twa}\")" "$file")"
done
say "done in $(($(date +%s) - started)) s of $budget"
