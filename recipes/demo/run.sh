#!/usr/bin/env bash
# Demo recipe: the embedded RAVDESS subset (4 actors, 240 clips), offline, CPU, a few minutes.
#   bash recipes/demo/run.sh [--stage N] [--stop_stage M] [--nj 2] [--device auto]
# Stages: 0 manifest, 1 extract, 3 train, 5 evaluate, 6 predict a sample.
# (2 align and 4 distill are not part of the demo: its text is one of two fixed sentences.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "${here}/../utils/common.sh"

stage=0
stop_stage=100
nj=2
device=auto
corpus_dir=${here}/data
feats=${here}/feats/demo
exp=${here}/exp/demo-probe-egemaps
features="mfcc egemaps"
model=probe
audio=egemaps
epochs=100
lr=1e-2
seeds=1
RECIPE_OPTIONS="stage stop_stage nj device corpus_dir feats exp features model audio epochs lr seeds"
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
fi

if stage_on 3; then
  # 4 actors: leave-one-speaker-out, dev actor carved from the 3 training actors
  log "stage 3: train ${model} on ${audio}, leave-one-speaker-out over 4 actors, ${seeds} seed(s)"
  sertool train "${feats}" -m "${model}" --audio "${audio}" --labels ravdess8 --protocol loso \
    --seeds "${seeds}" --epochs "${epochs}" --set optim.lr="${lr}" --device "${device}" -o "${exp}" --overwrite -q
fi

if stage_on 5; then
  log "stage 5: evaluate"
  sertool evaluate "${exp}" -q
  python - "${exp}/eval/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
s = m.get("summary", m)
print("\nDemo results (8 emotions, speaker-independent, test folds):")
print("| metric | mean | std |\n|---|---|---|")
for k in ("WA", "UA", "macro_f1"):
    v = s[k]
    print(f"| {k} | {v['mean']:.3f} | {v['std']:.3f} |" if isinstance(v, dict) else f"| {k} | {v} | |")
PY
fi

if stage_on 6; then
  log "stage 6: predict the clips of Actor_01 with the trained model"
  sertool predict "${exp}" "${corpus_dir}/audio/Actor_01" -o "${exp}/predictions-Actor_01.csv" --overwrite -q
  head -n 4 "${exp}/predictions-Actor_01.csv" | cut -c1-160
fi
log "done: features in ${feats}, experiment in ${exp}"
