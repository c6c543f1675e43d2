# Shared experiment helpers for recipes/<corpus>/run.sh (sourced after common.sh, not executed).
#   train_exp TAG MODEL [sertool train args...]
#       train MODEL into ${exp_root}/TAG when TAG is listed in ${models}; conf/TAG.yaml (the
#       paper configuration, in the recipe's conf/) is passed as --config when it exists.
#       Uses the recipe's variables feats, exp_root, conf_dir, seeds, epochs (empty = the
#       config's), device, threads, folds (empty = all; else fold names, e.g. "ses-Session1").
#   extract_feats CORPUS "FEATURE..." [extra sertool extract args...]
#       `sertool extract ${corpus_dir} --corpus CORPUS -o ${feats}` with one -f per distinct FEATURE
#       (none: the manifest only), --text-model ${text_model} when the recipe sets it, --nj, --device
#       (not for the manifest alone: naming a device makes extract import torch, ~2 s of CPU).
#   distill_exp [sertool distill teacher args...]
#       the CMD distillation into ${exp_root}/cmd-distill with conf/cmd-distill.yaml (+ ${distill_opts});
#       fine-tune it with `train_exp cmd cmd --init "${exp_root}/cmd-distill" --labels ... --protocol ...`.
#   evaluate_exps TITLE [extra sertool evaluate args...]
#       `sertool evaluate` every trained TAG of ${models}, then print one markdown table.
#   predict_sample SAMPLE_DIR
#       `sertool predict` the recordings of SAMPLE_DIR (transcripts from the manifest) with the first
#       TAG of ${models} that predict can use, and show the first rows; logs why it skips the others
#       (no predictor.json, speaker-level normalisation, or predict refusing with an `Error:` line).
#   write_transcripts MANIFEST WAV_DIR OUT.csv
#       file,text table of the manifest's utterances under WAV_DIR (for `sertool predict --transcripts`).
utils_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Use the repository's .venv when sertool is not on PATH (a fresh clone after `make setup`).
if ! command -v sertool >/dev/null 2>&1 && [ -x "${utils_dir}/../../.venv/bin/sertool" ]; then
  PATH="$(cd "${utils_dir}/../../.venv/bin" && pwd):${PATH}"
  export PATH
fi

in_list() { [[ " $2 " == *" $1 "* ]]; }

train_exp() {
  local tag=$1 model=$2
  shift 2
  in_list "${tag}" "${models}" || return 0
  local args=(--seeds "${seeds}" --device "${device}" --threads "${threads}" --overwrite -q)
  [ -f "${conf_dir}/${tag}.yaml" ] && args+=(--config "${conf_dir}/${tag}.yaml")
  [ -n "${epochs}" ] && args+=(--epochs "${epochs}")
  local f
  for f in ${folds}; do args+=(--fold "${f}"); done
  log "train ${tag}: sertool train ${feats} -m ${model} $* ${args[*]} -o ${exp_root}/${tag}"
  local start=${SECONDS}
  sertool train "${feats}" -m "${model}" "$@" "${args[@]}" -o "${exp_root}/${tag}"
  log "trained ${tag} in $(( SECONDS - start )) s"
}

extract_feats() {
  local corpus=$1 f seen=" " args=()
  shift
  for f in $1; do
    in_list "${f}" "${seen}" || { seen+="${f} "; args+=(-f "${f}"); }
  done
  shift
  [ -n "${text_model:-}" ] && [ ${#args[@]} -gt 0 ] && args+=(--text-model "${text_model}")
  [ ${#args[@]} -gt 0 ] || [ $# -gt 0 ] && args+=("$@" --nj "${nj}" --device "${device}")
  sertool extract "${corpus_dir}" --corpus "${corpus}" -o "${feats}" "${args[@]}" -q
}

distill_exp() {
  local dexp=${exp_root}/cmd-distill
  log "distill: sertool distill ${feats} -o ${dexp} $* --config ${conf_dir}/cmd-distill.yaml ${distill_opts:-}"
  # shellcheck disable=SC2086
  sertool distill "${feats}" -o "${dexp}" "$@" --config "${conf_dir}/cmd-distill.yaml" \
    --set distill.device="${device}" --set distill.threads="${threads}" --overwrite -q ${distill_opts:-}
}

evaluate_exps() {
  local title=$1
  shift
  local tag done_tags=()
  for tag in ${models}; do
    compgen -G "${exp_root}/${tag}/folds/*/seed*/model.safetensors" >/dev/null || continue
    log "evaluate ${tag}"
    sertool evaluate "${exp_root}/${tag}" --device "${device}" -q "$@"
    done_tags+=("${exp_root}/${tag}")
  done
  [ ${#done_tags[@]} -gt 0 ] && python "${utils_dir}/results_table.py" --title "${title}" "${done_tags[@]}"
  return 0
}

# speaker_normalised PREDICTOR_JSON: true when some modality's `normalize` entry is "speaker"
speaker_normalised() {
  python -c 'import json, sys; n = json.load(open(sys.argv[1])).get("normalize") or {}; sys.exit(0 if "speaker" in n.values() else 1)' "$1"
}

predict_sample() {
  local sample=$1 tag exp refusal err
  err=$(mktemp)
  for tag in ${models}; do
    exp=${exp_root}/${tag}
    if [ ! -f "${exp}/predictor.json" ]; then
      log "predict: skip ${tag} (no ${exp}/predictor.json: not trained here, or not finished)"; continue
    fi
    if speaker_normalised "${exp}/predictor.json"; then
      log "predict: skip ${tag} (speaker-level normalisation: needs every recording of a speaker, not deployable)"; continue
    fi
    log "predict ${sample} with ${tag} (transcripts from the manifest)"
    write_transcripts "${feats}/manifest.jsonl" "${sample}" "${exp}/transcripts-sample.csv"
    if ! sertool predict "${exp}" "${sample}" --transcripts "${exp}/transcripts-sample.csv" --device "${device}" \
         -o "${exp}/predictions-sample.csv" --overwrite -q 2> "${err}"; then
      refusal=$(grep -m 1 '^Error:' "${err}" || true)
      if [ -z "${refusal}" ]; then cat "${err}" >&2; rm -f "${err}"; return 1; fi
      log "predict: skip ${tag} (sertool predict refused: ${refusal#Error: })"; continue
    fi
    cat "${err}" >&2; rm -f "${err}"
    head -n 4 "${exp}/predictions-sample.csv" | cut -c1-160
    return 0
  done
  rm -f "${err}"
  log "predict: no experiment of '${models}' can predict ${sample}"
}

write_transcripts() {
  python - "$@" <<'PY'
import csv, json, os, sys
manifest, wav_dir, out = sys.argv[1:4]
base = os.path.dirname(os.path.abspath(manifest))
wav_dir = os.path.abspath(wav_dir)
with open(out, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file", "text"])
    for line in open(manifest):
        u = json.loads(line)
        if not u.get("audio"):
            continue
        path = os.path.normpath(os.path.join(base, u["audio"]))
        if path.startswith(wav_dir + os.sep):
            w.writerow([os.path.relpath(path, wav_dir), u.get("text", "")])
PY
}
