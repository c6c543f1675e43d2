#!/usr/bin/env bash
# Demo recipe: the embedded RAVDESS subset (4 actors, 240 clips), offline, CPU.
#   bash recipes/demo/run.sh [--stage N] [--stop_stage M] [--nj 2] [--device auto]
# Stages: 0 manifest, 1 extract. (align/train/evaluate/predict join as they land.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "${here}/../utils/common.sh"

stage=0
stop_stage=100
nj=2
device=auto
corpus_dir=${here}/data
feats=${here}/feats/demo
features="mfcc"
RECIPE_OPTIONS="stage stop_stage nj device corpus_dir feats features"
parse_options "$@"

if stage_on 0; then
  log "stage 0: manifest of ${corpus_dir}"
  sertool extract "${corpus_dir}" -o "${feats}" -q
fi

if stage_on 1; then
  log "stage 1: extract features (${features}) with ${nj} jobs"
  fargs=()
  for f in ${features}; do fargs+=(-f "$f"); done
  sertool extract "${corpus_dir}" -o "${feats}" "${fargs[@]}" --nj "${nj}" --device "${device}" -q
  sertool store info "${feats}"
fi
log "done: features in ${feats}"
