# Shared experiment helpers for recipes/<corpus>/run.sh (sourced after common.sh, not executed).
#   train_exp TAG MODEL [sertool train args...]
#       train MODEL into ${exp_root}/TAG when TAG is listed in ${models}; conf/TAG.yaml (the
#       paper configuration, in the recipe's conf/) is passed as --config when it exists.
#       Uses the recipe's variables feats, exp_root, conf_dir, seeds, epochs (empty = the
#       config's), device, threads, folds (empty = all; else fold names, e.g. "ses-Session1").
#   evaluate_exps TITLE [extra sertool evaluate args...]
#       `sertool evaluate` every trained TAG of ${models}, then print one markdown table.
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
