#!/usr/bin/env bash
# RAVDESS recipe: every sertool model, speaker-independent 6-fold (fold k tests actors 4k+1..4k+4),
# 8 emotions; stage 7 trains and packages the default model of `sertool predict`.
#   bash recipes/ravdess/run.sh --corpus_dir /data/ravdess [--stage N] [--stop_stage M] [--nj 2] [--device auto]
# Stages: 0 manifest, 1 extract, 2 align (LGCCT's word-aligned input), 3 train, 4 distill (CMD),
#         5 evaluate, 6 predict a sample; 7 (only when asked: --stage 7 --stop_stage 7) retrain
#         and package the default model (local/train_default_model.sh).
# RAVDESS text is one of two fixed sentences: the text branch carries no emotion information.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "${here}/../utils/common.sh"
. "${here}/../utils/experiments.sh"

stage=0
stop_stage=6
nj=2
device=auto
threads=1
corpus_dir=$(cd "${here}/../.." && pwd)/../shared/data/ravdess
feats=${here}/feats/ravdess
exp_root=${here}/exp
conf_dir=${here}/conf
acoustic_feat=mfcc           # probe (the default model's input): 120-d MFCC
word_feat=glove              # packaged GloVe 6B-50d
ssl_feat=whisper             # probe-whisper, self_attn, cross_attn, ks_transformer, cma, CMD teacher: packaged Whisper tiny.en states
lm_feat=bert                 # packaged MiniLM token states
text_model=minilm
lgcct_audio=covarep          # LGCCT: COVAREP-74 aligned with GloVe per word
align_length=50
protocol=speaker-kfold:6
labels=ravdess8
models="probe probe-whisper probe-whisper-spk self_attn cross_attn cma lgcct cmd whisper_ft"   # ks_transformer: add it on a GPU (RESULTS.md)
seeds=1
epochs=
folds=                       # empty: all folds (e.g. "fold1" for a smoke run)
distill_opts=
RECIPE_OPTIONS="stage stop_stage nj device threads corpus_dir feats exp_root conf_dir acoustic_feat word_feat ssl_feat lm_feat text_model lgcct_audio align_length protocol labels models seeds epochs folds distill_opts"
parse_options "$@"
aligned=aligned-${lgcct_audio}-${word_feat}-${align_length}.h5

if stage_on 0; then
  log "stage 0: manifest of ${corpus_dir}"
  extract_feats ravdess ""
fi

if stage_on 1; then
  f=
  in_list probe "${models}" && f+=" ${acoustic_feat}"
  for m in probe-whisper probe-whisper-spk self_attn cross_attn ks_transformer cma cmd; do
    in_list "${m}" "${models}" && f+=" ${ssl_feat} ${lm_feat}" && break
  done
  in_list lgcct "${models}" && f+=" ${lgcct_audio} ${word_feat}"
  log "stage 1: extract${f} with ${nj} jobs"
  extract_feats ravdess "${f}"
fi

if stage_on 2 && in_list lgcct "${models}"; then
  log "stage 2: align ${lgcct_audio} + ${word_feat} at ${align_length} words (forced alignment of the sentence)"
  sertool align "${feats}" --audio "${lgcct_audio}" --text "${word_feat}" --length "${align_length}" \
    --timings forced,uniform --nj "${nj}" --device "${device}" -q
fi

if stage_on 3; then
  log "stage 3: train (${labels}, ${protocol})"
  p=(--labels "${labels}" --protocol "${protocol}")
  train_exp probe probe --audio "${acoustic_feat}" "${p[@]}"
  train_exp probe-whisper probe --audio "${ssl_feat}" "${p[@]}"
  train_exp probe-whisper-spk probe --audio "${ssl_feat}" "${p[@]}"   # speaker-level normalisation
  train_exp self_attn self_attn --audio "${ssl_feat}" --text "${lm_feat}" "${p[@]}"
  train_exp cross_attn cross_attn --audio "${ssl_feat}" --text "${lm_feat}" "${p[@]}"
  train_exp ks_transformer ks_transformer --audio "${ssl_feat}" --text "${lm_feat}" "${p[@]}"
  train_exp cma cma --audio "${ssl_feat}" --text "${lm_feat}" "${p[@]}"
  train_exp lgcct lgcct --audio "${aligned}" --text "${aligned}" "${p[@]}"
  train_exp whisper_ft whisper_ft "${p[@]}"   # fine-tunes tiny.en on the waveform (no store)
fi

if stage_on 4 && in_list cmd "${models}"; then
  log "stage 4: CMD distillation (cached ${ssl_feat} + ${lm_feat} teachers), fine-tuned with ${protocol}"
  distill_exp --teacher-audio "${ssl_feat}" --teacher-text "${lm_feat}"
  train_exp cmd cmd --init "${exp_root}/cmd-distill" --labels "${labels}" --protocol "${protocol}"
fi

if stage_on 5; then
  log "stage 5: evaluate"
  evaluate_exps "RAVDESS test folds (${labels}, ${protocol})"
fi

if stage_on 6; then
  sample=$(find "${corpus_dir}" -type d -name Actor_01 | head -n 1)
  log "stage 6: predict a sample (${sample:-${corpus_dir}})"
  predict_sample "${sample:-${corpus_dir}}"
fi

if [ "${stage}" -le 7 ] && [ "${stop_stage}" -ge 7 ]; then
  log "stage 7: train and package the default model of sertool predict"
  bash "${here}/local/train_default_model.sh" --ravdess "${corpus_dir}" --nj "${nj}" --threads "${threads}"
fi
log "done: features in ${feats}, experiments in ${exp_root}"
