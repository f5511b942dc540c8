#!/usr/bin/env bash
# The paper's comparisons in miniature, offline: every method and the Table 4 ablation on two heterogeneous pairs of
# the 32-px models, on sklearn digits, 3 seeds each, then a mean +- std table (README, Evidence).
# Teachers see the whole training split (20 or 40 epochs); students see a fixed stratified fraction of it, so that a student trained
# from scratch is well below its teacher. Restartable: finished runs are skipped.
#   bash evidence.sh                      # OUT=runs/evidence SEEDS="0 1 2" EPOCHS=20 bash evidence.sh
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/evidence}
SEEDS=${SEEDS:-0 1 2}
EPOCHS=${EPOCHS:-20}
COMMON="--dataset digits --epochs $EPOCHS --batch-size 16 --dim 128 --log-every 1000"
# teacher, student, the students' train fraction, teacher epochs (a ViT needs more than 20 to be a good teacher here)
PAIRS=("convnext_mini vit_mini 0.25 20" "vit_mini resnet_mini 0.05 40")

done_run() { [ -f "$1/log.jsonl" ] && [ "$(wc -l < "$1/log.jsonl")" -eq "$EPOCHS" ]; }

for pair in "${PAIRS[@]}"; do
  read -r teacher student frac tepochs <<< "$pair"
  tdir=$OUT/teachers/$teacher
  [ -f "$tdir/best.pt" ] || python train.py $COMMON --epochs "$tepochs" --method ce --student "$teacher" --out "$tdir" \
    --overwrite | tail -n 1
  for seed in $SEEDS; do
    for config in ce kd dkd ofa fitnet raa raa+afp_nofeedback fofa; do
      case $config in
        raa) flags="--afp-stages none" ;;                     # Table 4: + RAA
        raa+afp_nofeedback) flags="--no-feedback" ;;           # Table 4: + AFP without feedback
        fofa) flags="" ;;                                       # Table 4: + AFP (FOFA)
        *) flags="--method $config" ;;
      esac
      dir=$OUT/$teacher-$student/$config/seed$seed
      done_run "$dir" && continue
      echo "$teacher -> $student, $config, seed $seed"
      python train.py $COMMON $flags --teacher "$teacher" --student "$student" --teacher-ckpt "$tdir/best.pt" \
        --train-fraction "$frac" --seed "$seed" --out "$dir" --overwrite | tail -n 1
    done
  done
done
python eval.py --summarize "$OUT"
