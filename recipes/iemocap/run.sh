#!/usr/bin/env bash
# IEMOCAP recipe: the papers' two protocols on one set of features.
#   bash recipes/iemocap/run.sh --corpus_dir /data/IEMOCAP_full_release [--stage N] [--stop_stage M] [--nj 2] [--device auto]
#   bash recipes/iemocap/run.sh --fake true      # no IEMOCAP here: generate a small corpus in its layout first
# Stages: 0 manifest, 1 extract, 2 align (not needed: no IEMOCAP model here takes aligned input),
#         3 train, 4 distill (CMD), 5 evaluate, 6 predict a sample.
#  * 4 classes (neutral, happy + excited, angry, sad), leave-one-session-out (5 folds, dev = held-out
#    training speakers): KS-Transformer, Krishna D N (cma), CMD (stage 4).
#  * 7 classes (Rajan et al.): 5 random stratified splits train : dev : test = 8 : 0.5 : 1.5,
#    self_attn and cross_attn, audio + text.
# The papers' wav2vec 2.0 / RoBERTa features need model downloads; offline the recipe uses the
# packaged Whisper tiny.en encoder (--ssl_feat whisper) and MiniLM (--lm_feat bert). See README.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "${here}/../utils/common.sh"
. "${here}/../utils/experiments.sh"

stage=0
stop_stage=6
nj=2
device=auto
threads=1
corpus_dir=${here}/dump/fake-iemocap
fake=false                     # true: generate a small IEMOCAP-layout corpus into corpus_dir (stage 0)
fake_per_label=2               # sentences per label and speaker of the generated corpus
fake_audio=espeak              # espeak (espeak-ng speech) | synthetic (tones)
feats=${here}/feats/iemocap
exp_root=${here}/exp
conf_dir=${here}/conf
ssl_feat=whisper               # speech-model frame states for ks_transformer / cma / CMD (paper: wav2vec 2.0)
lm_feat=bert                   # language-model token states (paper: RoBERTa-large / BERT-base)
text_model=minilm              # --text-model of -f bert
acoustic_feat=mfcc             # Rajan et al.: 120-d MFCC (40 + deltas + delta-deltas)
word_feat=glove                # Rajan et al.: GloVe (packaged 6B-50d; glove:path=FILE for 300-d)
models="ks_transformer cma cmd self_attn cross_attn"
seeds=1
epochs=                        # empty: each model's configured epochs
folds4=                        # 4-class folds to train (empty: all; e.g. "ses-Session1" for a smoke run)
folds7=                        # 7-class (Rajan) folds to train (empty: all; e.g. "fold1")
distill_opts=                  # extra `sertool distill` options, e.g. "--set distill.epochs=5"
RECIPE_OPTIONS="stage stop_stage nj device threads corpus_dir fake fake_per_label fake_audio feats conf_dir exp_root ssl_feat lm_feat text_model acoustic_feat word_feat models seeds epochs folds4 folds7 distill_opts"
parse_options "$@"

if stage_on 0; then
  if [ "${fake}" = true ]; then
    log "stage 0: generate a small IEMOCAP-layout corpus in ${corpus_dir}"
    python "${here}/local/make_fake_corpus.py" "${corpus_dir}" --per_label "${fake_per_label}" --audio "${fake_audio}"
  fi
  log "stage 0: manifest of ${corpus_dir} (all labels; label sets are chosen at training time)"
  extract_feats iemocap ""
fi

if stage_on 1; then
  f=
  in_list ks_transformer "${models}" || in_list cma "${models}" || in_list cmd "${models}" && f+=" ${ssl_feat} ${lm_feat}"
  in_list self_attn "${models}" || in_list cross_attn "${models}" && f+=" ${acoustic_feat} ${word_feat}"
  log "stage 1: extract${f} with ${nj} jobs"
  extract_feats iemocap "${f}"
fi

if stage_on 2; then
  log "stage 2: nothing to align (no IEMOCAP model of this recipe takes word-aligned input;" \
      "for LGCCT: sertool align ${feats} --audio covarep --text glove --length 50 --timings corpus)"
fi

if stage_on 3; then
  log "stage 3: 4 classes, leave-one-session-out"
  four=(--labels iemocap4 --protocol loso-session)
  folds=${folds4}
  train_exp ks_transformer ks_transformer --audio "${ssl_feat}" --text "${lm_feat}" "${four[@]}"
  train_exp cma cma --audio "${ssl_feat}" --text "${lm_feat}" "${four[@]}"
  log "stage 3: 7 classes, Rajan et al. 8 : 0.5 : 1.5 x 5"
  seven=(--labels iemocap7 --protocol rajan:5)
  folds=${folds7}
  train_exp self_attn self_attn --audio "${acoustic_feat}" --text "${word_feat}" "${seven[@]}"
  train_exp cross_attn cross_attn --audio "${acoustic_feat}" --text "${word_feat}" "${seven[@]}"
fi

if stage_on 4 && in_list cmd "${models}"; then
  log "stage 4: CMD distillation (teachers: cached ${ssl_feat} + ${lm_feat} states), fine-tuned leave-one-session-out"
  distill_exp --teacher-audio "${ssl_feat}" --teacher-text "${lm_feat}"
  folds=${folds4}
  train_exp cmd cmd --init "${exp_root}/cmd-distill" --labels iemocap4 --protocol loso-session
fi

if stage_on 5; then
  log "stage 5: evaluate"
  evaluate_exps "IEMOCAP test folds (ks_transformer, cma, cmd: 4 classes LOSO; self_attn, cross_attn: 7 classes Rajan)"
fi

if stage_on 6; then
  sample=$(ls -d "${corpus_dir}"/Session5/sentences/wav/*/ | head -n 1)
  log "stage 6: predict a sample (${sample})"
  predict_sample "${sample}"
fi
log "done: features in ${feats}, experiments in ${exp_root}"
