#!/usr/bin/env bash
# Train and package the default model of `sertool predict` (sertool/pretrained/ravdess-mfcc).
#   bash recipes/ravdess/local/train_default_model.sh [--ravdess DIR] [--stage N] [--stop_stage M]
# Stages: 0 extract MFCC features of the full RAVDESS speech copy (1,440 files, 24 actors)
#         1 train the probe, 6-fold cross-validation by actors (speaker-independent scores), then
#           (run.final=all) the deployment model on all 1,440 recordings for the median of the
#           folds' selected epoch counts, normalised with statistics of all recordings
#         2 package that final model into sertool/pretrained/ravdess-mfcc (README with the CV scores)
# Offline and CPU only: the features need no model download. About 10 minutes on 2 cores.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
recipe=$(cd "${here}/.." && pwd)
repo=$(cd "${recipe}/../.." && pwd)
. "${repo}/recipes/utils/common.sh"

stage=0
stop_stage=100
ravdess=${repo}/../shared/data/ravdess
feats=${recipe}/feats/full
exp=${recipe}/exp/default-probe-mfcc
out=${repo}/sertool/pretrained/ravdess-mfcc
nj=2
threads=1
RECIPE_OPTIONS="stage stop_stage ravdess feats exp out nj threads"
parse_options "$@"

if stage_on 0; then
  log "stage 0: MFCC (40 + deltas + delta-deltas, 120-d, 100 frames/s) of ${ravdess}"
  sertool extract "${ravdess}" --corpus ravdess -o "${feats}" -f mfcc --nj "${nj}" -q
fi

if stage_on 1; then
  log "stage 1: probe (mean + std pooling, linear), ravdess8, speaker-kfold:6 + final model on all data -> ${exp}"
  sertool train "${feats}" -m probe --audio mfcc --labels ravdess8 --protocol speaker-kfold:6 \
    --set optim.lr=0.01 --epochs 100 --set train.early_stopping=20 --set run.final=all --threads "${threads}" \
    --overwrite -q -o "${exp}"
  cat "${exp}/metrics.json" | python -c 'import json,sys; s=json.load(sys.stdin)["summary"]; print({k: round(v["mean"], 4) for k, v in s.items()})'
fi

if stage_on 2; then
  log "stage 2: package ${exp} -> ${out}"
  python "${here}/package_model.py" "${exp}" "${out}"
fi
log "done"
