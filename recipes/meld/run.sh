#!/usr/bin/env bash
# MELD recipe: the text-branch models on MELD's own train / dev / test split, 7 emotions; the audio
# stages run too when the MELD audio (train_splits/, dev_splits/, test_splits/ wav) is present.
#   bash recipes/meld/run.sh --corpus_dir /data/meld [--stage N] [--stop_stage M] [--nj 2] [--device auto]
#   bash recipes/meld/run.sh --fake true      # a small generated MELD-layout corpus (text only)
# Stages: 0 manifest, 1 extract, 2 align (audio only), 3 train, 4 distill (CMD, text student),
#         5 evaluate, 6 predict a sample (audio only).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "${here}/../utils/common.sh"
. "${here}/../utils/experiments.sh"

stage=0
stop_stage=6
nj=2
device=auto
threads=1
corpus_dir=$(cd "${here}/../.." && pwd)/../shared/data/meld-text
fake=false
fake_per_label=6
feats=${here}/feats/meld
exp_root=${here}/exp
conf_dir=${here}/conf
word_feat=glove              # packaged GloVe 6B-50d
lm_feat=bert                 # packaged MiniLM token states
text_model=minilm
acoustic_feat=mfcc           # audio models, when the audio is present
models="probe probe-bert self_attn self_attn-bert text_ft cmd self_attn-av lgcct"   # text_ft: MiniLM fine-tuned, ~35 min per seed on one core
seeds=1
epochs=
folds=
distill_opts=
RECIPE_OPTIONS="stage stop_stage nj device threads corpus_dir fake fake_per_label feats exp_root conf_dir word_feat lm_feat text_model acoustic_feat models seeds epochs distill_opts"
parse_options "$@"
aligned=aligned-${acoustic_feat}-${word_feat}-50.h5
has_audio() { grep -q '"audio": "' "${feats}/manifest.jsonl"; }

if stage_on 0; then
  if [ "${fake}" = true ]; then
    log "stage 0: generate a small MELD-layout corpus in ${corpus_dir}"
    python "${here}/local/make_fake_corpus.py" "${corpus_dir}" --per_label "${fake_per_label}"
  fi
  log "stage 0: manifest of ${corpus_dir}"
  extract_feats meld ""
fi

if stage_on 1; then
  f=${word_feat}
  in_list probe-bert "${models}" || in_list cmd "${models}" && f+=" ${lm_feat}"
  has_audio && f+=" ${acoustic_feat}"
  log "stage 1: extract ${f}"
  extract_feats meld "${f}"
fi

if stage_on 2; then
  if has_audio && in_list lgcct "${models}"; then
    log "stage 2: align ${acoustic_feat} + ${word_feat} at 50 words"
    sertool align "${feats}" --audio "${acoustic_feat}" --text "${word_feat}" --length 50 --nj "${nj}" --device "${device}" -q
  else
    log "stage 2: skipped (no MELD audio in ${corpus_dir}: nothing to align)"
  fi
fi

if stage_on 3; then
  p=(--labels meld7 --protocol corpus)
  log "stage 3: text models, MELD split"
  train_exp probe probe --text "${word_feat}" "${p[@]}"
  train_exp probe-bert probe --text "${lm_feat}" "${p[@]}"
  train_exp self_attn self_attn --text "${word_feat}" "${p[@]}"
  train_exp self_attn-bert self_attn --text "${lm_feat}" "${p[@]}"
  train_exp text_ft text_ft --set model.encoder="${text_model}" "${p[@]}"   # its own tokenizer on the manifest text
  if has_audio; then
    log "stage 3: audio + text models (the MELD audio is present)"
    train_exp self_attn-av self_attn --audio "${acoustic_feat}" --text "${word_feat}" --set 'model.modalities=[audio,text]' "${p[@]}"
    train_exp lgcct lgcct --audio "${aligned}" --text "${aligned}" --set model.task=classification --set train.loss=ce "${p[@]}"
  fi
fi

if stage_on 4 && in_list cmd "${models}"; then
  log "stage 4: CMD, text student distilled from cached ${lm_feat} states, fine-tuned on the MELD split"
  distill_exp --teacher-text "${lm_feat}"
  train_exp cmd cmd --init "${exp_root}/cmd-distill" --labels meld7 --protocol corpus
fi

if stage_on 5; then
  log "stage 5: evaluate"
  evaluate_exps "MELD test split (meld7)"
fi

if stage_on 6; then
  if has_audio; then
    sample=$(ls -d "${corpus_dir}"/test_splits* | head -n 1)
    log "stage 6: predict a sample (${sample})"
    predict_sample "${sample}"
  else
    log "stage 6: skipped (sertool predict takes recordings; ${corpus_dir} has none)"
  fi
fi
log "done: features in ${feats}, experiments in ${exp_root}"
