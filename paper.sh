#!/usr/bin/env bash
# The tables of the FOFA paper (AAAI 2025, arXiv 2501.08885): one run directory per cell and seed,
# $RUNS/<dataset>/<teacher>-<student>/<config>/seed<N>, read back by
# `python eval.py --summarize $RUNS --paper TABLE` (our mean +- std beside the paper's numbers).
#
#   bash paper.sh 1         # Table 1, CIFAR-100: 12 pairs x (the student from scratch, KD, DKD,
#                           #   DIST, OFA, FitNet, CC, RKD, FOFA; FBT and HCD beyond the paper's)
#   bash paper.sh 2         # Table 2, ImageNet-1k: its 4 pairs, the same methods
#   bash paper.sh 4         # Table 4, CIFAR-100 ConvNeXt-T -> DeiT-T: FitNet, + RAA (--afp-stages
#                           #   none), + AFP without feedback (--no-feedback), + AFP (FOFA)
#   bash paper.sh 5         # Table 5, same pair: AFP before every subset of the teacher's stages
#   bash paper.sh 6         # Table 6, same pair: N_q 36, 64, 100, 144
#   bash paper.sh 1 --list  # every cell's command, global batch and state; runs nothing
#   bash paper.sh 1 --dry-run [DIR]  # every cell built at its real input size, 2 steps of batch 2
#                           #   on CPU: fake CIFAR-100 and ImageFolder (in DIR), random teachers;
#                           #   PARALLEL processes share the cores
#
# Finished runs (log.jsonl up to --epochs) are skipped, interrupted ones resume from their last.pt;
# a cell of two tables (FOFA, FitNet on ConvNeXt-T -> DeiT-T) is one run. Runs write a train.log.
# Settings (environment, default):
#   SEEDS ("0 1 2": the paper averages 3 trials), GPUS (processes per run: 1; each gets the cell's
#   global batch / GPUS), PARALLEL (runs at once, each on GPUS GPUs of its own: 1), ONLY (a bash
#   regex on "<pair>/<config>", e.g. '^swin_t-resnet18/' or '/fofa$'), RUNS (runs/paper), DATA
#   (CIFAR-100 root: data), IMAGENET (data/imagenet), TEACHERS (teachers), WORKERS (loader
#   processes per process: 8), PYTHON (python).
#
# Download once, online (nothing else reaches the network):
# - CIFAR-100 (Tables 1, 4-6): https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into $DATA.
# - OFA's CIFAR-100 teachers, the paper's, into $TEACHERS: convnext_tiny_cifar100.pth,
#   swin_tiny_patch4_window7_224_cifar100.pth, vit_small_patch16_224_cifar100.pth and
#   mixer_b16_224_cifar100.pth, the checkpoint-cifar100 release of
#   https://github.com/Hao840/OFAKD/releases
# - ImageNet-1k (Table 2): $IMAGENET/train/<class>/*.JPEG and $IMAGENET/val/<class>/*.JPEG.
# - timm's ImageNet teachers (Table 2), into timm's Hugging Face cache: python -c "import timm;
#   [timm.create_model(n, pretrained=True) for n in ('convnext_tiny.fb_in1k',
#   'swin_tiny_patch4_window7_224.ms_in1k', 'mixer_b16_224.goog_in21k_ft_in1k')]"
#   (runs then read the cache with HF_HUB_OFFLINE=1, set here unless you set it).
#
# Recipes (the official configs): CIFAR-100 300 epochs, global batch 128 (the official scripts:
# 1 GPU x 128), EMA 0.9998; train.py's cnn recipe (SGD 0.05) for ResNet18 and MobileNetV2, its vit
# recipe (AdamW 5e-4, mixup) for the others. ImageNet: CNN students 100 epochs, global batch 256
# (4 x 64), SGD 0.1, weight decay 1e-4, 3 warm-up epochs, EMA 0.9998 (cosine; the official rate
# drops 10x every 30 epochs); ViT/MLP students 300 epochs, global batch 512 (4 x 128), EMA 0.99996
# (lowest rate 1e-5; the official 1e-6); FOFA with N_q 144, the paper's ImageNet setting. As in the
# official code, the learning rate does not scale with the global batch.
set -euo pipefail
cd "$(dirname "$0")"
die() { echo "paper.sh: $*" >&2; exit 1; }

TABLE=${1:-}
MODE=${2:---run}
[[ $TABLE =~ ^[12456]$ ]] || die "give a table: 1, 2, 4, 5 or 6 (paper.sh 1 [--list | --dry-run])."
[[ $MODE =~ ^--(run|list|dry-run)$ ]] || die "unknown option '$MODE': use --list or --dry-run."
SEEDS=${SEEDS:-0 1 2} GPUS=${GPUS:-1} PARALLEL=${PARALLEL:-1} RUNS=${RUNS:-runs/paper}
DATA=${DATA:-data} IMAGENET=${IMAGENET:-data/imagenet} TEACHERS=${TEACHERS:-teachers}
WORKERS=${WORKERS:-8} PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # timm's ImageNet teachers: from its cache (see above)
for v in GPUS PARALLEL; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v=${!v} is not a positive integer."
done
[[ $WORKERS =~ ^[0-9]+$ ]] || die "WORKERS=$WORKERS is not an integer >= 0."
[[ $SEEDS =~ ^[0-9\ ]*[0-9][0-9\ ]*$ ]] || die "SEEDS='$SEEDS' is not a list of integers (0 1 2)."
if [[ $MODE == --dry-run ]]; then
  DRY=${3:-$(mktemp -d)}
  [[ -n ${3:-} ]] || trap 'rm -rf "$DRY"' EXIT
  mkdir -p "$DRY" || die "cannot make the dry-run directory $DRY."
  DATA=$DRY IMAGENET=$DRY/imagenet
fi

CIFAR_PAIRS="swin_t:resnet18 vit_s:resnet18 mixer_b16:resnet18 swin_t:mobilenetv2 vit_s:mobilenetv2
  mixer_b16:mobilenetv2 convnext_t:deit_t mixer_b16:deit_t convnext_t:swin_p mixer_b16:swin_p
  convnext_t:resmlp_s12 swin_t:resmlp_s12"
IMAGENET_PAIRS="swin_t:resnet18 mixer_b16:mobilenetv2 convnext_t:deit_t swin_t:resmlp_s12"
METHODS="kd dkd dist ofa fitnet cc rkd fofa fbt hcd"  # the paper's order; CRD is not implemented
declare -A CIFAR_FILE=([convnext_t]=convnext_tiny [swin_t]=swin_tiny_patch4_window7_224
                       [vit_s]=vit_small_patch16_224 [mixer_b16]=mixer_b16_224)
declare -A IMAGENET_TEACHER=([convnext_t]=convnext_tiny.fb_in1k
                             [swin_t]=swin_tiny_patch4_window7_224.ms_in1k
                             [mixer_b16]=mixer_b16_224.goog_in21k_ft_in1k)

C_DATASET=() C_PAIR=() C_CONFIG=() C_BATCH=() C_EPOCHS=() C_ARGS=()  # one entry per cell
add() {  # dataset pair config global_batch epochs train.py-arguments...
  [[ -z ${ONLY:-} || "$2/$3" =~ $ONLY ]] || return 0
  C_DATASET+=("$1") C_PAIR+=("$2") C_CONFIG+=("$3") C_BATCH+=("$4") C_EPOCHS+=("$5")
  shift 5
  C_ARGS+=("$(quote "$@")")
}
quote() {  # shell words, quoted only where needed (a user copies the commands)
  local word
  for word; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,+-]+$ ]]; then
      printf '%s ' "$word"
    else
      printf '%q ' "$word"
    fi
  done
}

recipe() {  # dataset student -> BATCH EPOCHS RECIPE (the global batch, the epochs, train.py flags)
  if [[ $1 == cifar100 ]]; then
    BATCH=128 EPOCHS=300 RECIPE=(--dataset cifar100 --data-dir "$DATA" --ema 0.9998)
  elif [[ $2 == resnet18 || $2 == mobilenetv2 ]]; then
    BATCH=256 EPOCHS=100 RECIPE=(--dataset imagenet --data-dir "$IMAGENET" --lr 0.1 --wd 1e-4
                                 --warmup-epochs 3 --ema 0.9998)
  else
    BATCH=512 EPOCHS=300 RECIPE=(--dataset imagenet --data-dir "$IMAGENET" --ema 0.99996)
  fi
}

method() {  # config dataset -> METHOD (train.py flags)
  case $1 in
    raa) METHOD=(--method fofa --afp-stages none) ;;       # Table 4: FitNet + RAA
    afp_nofb) METHOD=(--method fofa --no-feedback) ;;      # + AFP without the student's feedback
    afp[1-4]*) METHOD=(--method fofa --afp-stages "$(echo "${1#afp}" | sed 's/./&,/g; s/,$//')") ;;
    nq*) METHOD=(--method fofa --nq "${1#nq}") ;;
    fofa) METHOD=(--method fofa) ;;
    *) METHOD=(--method "$1") ;;
  esac
  if [[ $1 == fofa && $2 == imagenet ]]; then
    METHOD+=(--nq 144)
  fi
}

pair_cell() {  # dataset teacher student config
  recipe "$1" "$3"
  method "$4" "$1"
  if [[ -n ${DRY:-} ]]; then
    teacher=(--teacher "$2" --teacher-ckpt random)
  elif [[ $1 == cifar100 ]]; then
    teacher=(--teacher "$2" --teacher-ckpt "$TEACHERS/${CIFAR_FILE[$2]}_cifar100.pth")
  else
    teacher=(--teacher "${IMAGENET_TEACHER[$2]}" --teacher-ckpt timm)
  fi
  add "$1" "$2-$3" "$4" "$BATCH" "$EPOCHS" "${teacher[@]}" --student "$3" "${METHOD[@]}" \
    "${RECIPE[@]}"
}

table_cells() {  # dataset pairs: the student from scratch, then every method on every pair
  local dataset=$1 pair students=""
  for pair in $2; do
    [[ " $students " == *" ${pair#*:} "* ]] || students+=" ${pair#*:}"
  done
  for student in $students; do
    recipe "$dataset" "$student"
    add "$dataset" "scratch-$student" ce "$BATCH" "$EPOCHS" --student "$student" --method ce \
      "${RECIPE[@]}"
  done
  for pair in $2; do
    for config in $METHODS; do
      pair_cell "$dataset" "${pair%:*}" "${pair#*:}" "$config"
    done
  done
}

case $TABLE in
  1) table_cells cifar100 "$CIFAR_PAIRS" ;;
  2) table_cells imagenet "$IMAGENET_PAIRS" ;;
  4) CONFIGS="fitnet raa afp_nofb fofa" ;;
  5) CONFIGS="fitnet afp1 afp2 afp3 afp4 afp12 afp13 afp14 afp23 afp24 afp34 afp123 afp124 afp134
               afp234 fofa" ;;  # afp134: --afp-stages 1,3,4; fofa: all 4 (README: every subset)
  6) CONFIGS="fitnet nq36 fofa nq100 nq144" ;;  # fofa: N_q 64; the paper's 80 is no 4 k^2 (k x k)
esac
for config in ${CONFIGS:-}; do
  pair_cell cifar100 convnext_t deit_t "$config"
done
(( ${#C_PAIR[@]} )) || die "no cell of Table $TABLE matches ONLY='${ONLY:-}'."

if [[ $MODE == --dry-run ]]; then  # PARALLEL processes of paper_dry_run.py, a cell a line
  "$PYTHON" paper_dry_run.py "$DRY" < /dev/null > /dev/null  # the fake data, before they share it
  threads=$(( $(nproc) / PARALLEL > 0 ? $(nproc) / PARALLEL : 1 ))
  pids=()
  for (( k = 0; k < PARALLEL; k++ )); do
    for (( i = k; i < ${#C_PAIR[@]}; i += PARALLEL )); do
      label="${C_DATASET[i]} ${C_PAIR[i]}/${C_CONFIG[i]} (global batch ${C_BATCH[i]})"
      echo "$(quote "$label")${C_ARGS[i]}--epochs 1 --max-steps 2 --batch-size 2 --workers 0" \
           "--seed 0 --out $(quote "$DRY/run$k")--overwrite"
    done | OMP_NUM_THREADS=$threads "$PYTHON" paper_dry_run.py "$DRY" &
    pids+=($!)
  done
  failed=0
  for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
  done
  (( failed == 0 )) || die "the dry run of Table $TABLE failed: see the lines above."
  echo "# Table $TABLE: all ${#C_PAIR[@]} cells built and stepped"
  exit 0
fi

last_epoch() {  # the last epoch in a run's log.jsonl, or 0
  tail -n 1 "$1/log.jsonl" 2>/dev/null | sed -n 's/^{"epoch": \([0-9]*\),.*/\1/p' | grep . \
    || echo 0
}

if (( GPUS > 1 )); then
  LAUNCH="$PYTHON -m torch.distributed.run --standalone --nproc_per_node $GPUS train.py"
else
  LAUNCH="$PYTHON train.py"
fi
P_CMD=() P_DIR=() P_LABEL=()  # the runs to do
for i in "${!C_PAIR[@]}"; do
  (( C_BATCH[i] % GPUS == 0 )) || die "the global batch ${C_BATCH[i]} of" \
    "${C_PAIR[i]}/${C_CONFIG[i]} is not a multiple of GPUS=$GPUS."
  per=$(( C_BATCH[i] / GPUS ))
  for seed in $SEEDS; do
    dir=$RUNS/${C_DATASET[i]}/${C_PAIR[i]}/${C_CONFIG[i]}/seed$seed
    label="${C_DATASET[i]} ${C_PAIR[i]}/${C_CONFIG[i]} seed $seed"
    cmd="$LAUNCH ${C_ARGS[i]}--epochs ${C_EPOCHS[i]} --batch-size $per --workers $WORKERS"
    cmd+=" --seed $seed"
    cmd+=" --out $(quote "$dir")"
    cmd=${cmd% }
    done_epochs=$(last_epoch "$dir")
    if (( done_epochs >= C_EPOCHS[i] )); then
      state="done"
    elif [[ -f $dir/last.pt ]]; then
      state="resumes after epoch $done_epochs" cmd+=" --resume"
    else
      state="to run"
    fi
    echo "# $label: global batch ${C_BATCH[i]} = $GPUS GPU(s) x $per, $state"
    echo "$cmd"
    if [[ $state != done ]]; then
      P_CMD+=("$cmd") P_DIR+=("$dir") P_LABEL+=("$label")
    fi
  done
done
echo "# Table $TABLE: ${#P_CMD[@]} runs to do"
[[ $MODE == --run ]] || exit 0

worker() {  # runs k, k + PARALLEL, ... on GPUs k*GPUS .. k*GPUS + GPUS - 1 (when PARALLEL > 1)
  local k=$1 failed=0 j
  if (( PARALLEL > 1 )); then
    export CUDA_VISIBLE_DEVICES=$(seq -s, $(( k * GPUS )) $(( k * GPUS + GPUS - 1 )))
  fi
  for (( j = k; j < ${#P_CMD[@]}; j += PARALLEL )); do
    mkdir -p "${P_DIR[j]}"
    echo "started ${P_LABEL[j]} (log: ${P_DIR[j]}/train.log)"
    if eval "${P_CMD[j]}" >> "${P_DIR[j]}/train.log" 2>&1; then
      echo "finished ${P_LABEL[j]}: $(tail -n 1 "${P_DIR[j]}/train.log")"
    else
      echo "FAILED ${P_LABEL[j]}: $(tail -n 1 "${P_DIR[j]}/train.log")"
      failed=$(( failed + 1 ))
    fi
  done
  return $(( failed > 0 ))
}
pids=()
for (( k = 0; k < PARALLEL; k++ )); do
  worker "$k" &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do
  wait "$pid" || failed=1
done
(( failed == 0 )) || die "some runs failed: see the FAILED lines and their train.log."
echo "# Table $TABLE: all runs finished; python eval.py --summarize $RUNS --paper $TABLE"
