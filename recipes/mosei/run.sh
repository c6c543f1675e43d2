#!/usr/bin/env bash
# CMU-MOSEI recipe: LGCCT on the CMU Multimodal SDK's .csd files, word-aligned length 50, and its
# length-generalisation experiment (LGCCT Tables 4-5: train at 30, 40, 50 words, test at 30, 40, 50).
#   bash recipes/mosei/run.sh --corpus_dir /data/cmu-mosei-csd [--stage N] [--stop_stage M] [--nj 2] [--device auto]
#   bash recipes/mosei/run.sh --fake true      # no CMU-MOSEI here: generate small .csd files in its layout first
# corpus_dir holds CMU_MOSEI_Labels.csd, CMU_MOSEI_TimestampedWords.csd, CMU_MOSEI_COVAREP.csd
# (and optionally folds.json with the SDK's standard train/valid/test videos).
# Stages: 0 manifest, 1 extract (import COVAREP from the .csd, GloVe from the words), 2 align,
#         3 train, 4 distill (not possible: see README.md), 5 evaluate (train x test lengths),
#         6 predict (not possible from .csd features: see README.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "${here}/../utils/common.sh"
. "${here}/../utils/experiments.sh"

stage=0
stop_stage=6
nj=2
device=auto
threads=1
corpus_dir=${here}/dump/fake-mosei
fake=false                  # true: generate small .csd files into corpus_dir (stage 0)
fake_videos=24
feats=${here}/feats/mosei
exp_root=${here}/exp
conf_dir=${here}/conf
audio_feat=csd_covarep      # COVAREP imported from CMU_MOSEI_COVAREP.csd
text_feat=glove             # GloVe of the SDK's words (glove:path=glove.840B.300d.txt for the paper's 300-d)
length=50                   # aligned words per segment
lengths="30 40 50"          # train / test lengths of Tables 4-5 (each <= length)
models="lgcct"
seeds=1
epochs=
folds=
RECIPE_OPTIONS="stage stop_stage nj device threads corpus_dir fake fake_videos feats exp_root conf_dir audio_feat text_feat length lengths models seeds epochs"
parse_options "$@"
aligned=aligned-${audio_feat}-${text_feat%%:*}-${length}.h5

if stage_on 0; then
  if [ "${fake}" = true ]; then
    log "stage 0: generate small CMU-MOSEI .csd files in ${corpus_dir}"
    python "${here}/local/make_fake_corpus.py" "${corpus_dir}" --videos "${fake_videos}"
  fi
  log "stage 0: manifest of ${corpus_dir} (segments of the labels .csd, words of the timestamped words)"
  extract_feats mosei ""
fi

if stage_on 1; then
  log "stage 1: import the .csd sequences (csd_<name> stores) and extract ${text_feat} of the words"
  extract_feats mosei "${text_feat}" --import-csd
fi

if stage_on 2; then
  log "stage 2: align ${audio_feat} + ${text_feat%%:*} at ${length} words per segment (the SDK's word intervals)"
  sertool align "${feats}" --audio "${audio_feat}" --text "${text_feat%%:*}" --length "${length}" --timings corpus \
    --nj "${nj}" -q
fi

if stage_on 3; then
  for L in ${lengths}; do
    log "stage 3: LGCCT trained on the first ${L} aligned words (MOSEI's own train / valid / test split)"
    train_exp lgcct lgcct --audio "${aligned}" --text "${aligned}" --labels mosei --protocol corpus \
      --set data.max_steps.audio="${L}" --set data.max_steps.text="${L}"
    [ -d "${exp_root}/lgcct" ] && rm -rf "${exp_root}/lgcct-train${L}" && mv "${exp_root}/lgcct" "${exp_root}/lgcct-train${L}"
  done
fi

if stage_on 4; then
  log "stage 4: CMD distillation is not possible on the .csd release (no waveforms, no speech/text model states); see README.md"
fi

if stage_on 5; then
  tables=()
  for L in ${lengths}; do
    e=${exp_root}/lgcct-train${L}
    [ -f "${e}/metrics.json" ] || continue
    for T in ${lengths}; do
      log "stage 5: evaluate lgcct-train${L} on test segments of ${T} words"
      sertool evaluate "${e}" --crop-length "${T}" --device "${device}" -q
    done
    tables+=("${e}")
  done
  if [ ${#tables[@]} -gt 0 ]; then
    for T in ${lengths}; do
      python "${utils_dir}/results_table.py" --eval "eval-crop${T}" --title "CMU-MOSEI test, ${T} words (rows: training length)" "${tables[@]}"
    done
  fi
fi

if stage_on 6; then
  log "stage 6: predict is not possible for models on .csd features (COVAREP from the SDK cannot be recomputed for a new wav); see README.md"
fi
log "done: features in ${feats}, experiments in ${exp_root}"
