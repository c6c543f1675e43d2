#!/usr/bin/env bash
# Does a change move any result?  Train the same models on one fold with fixed seeds at an older
# revision and at the working tree, and print both test scores and the largest difference.
#
#   scripts/train_equivalence.sh OLD_REV FEATS [FOLD]
#
# FEATS needs the stores `mfcc` and `glove` (e.g. `sertool extract recipes/demo/data -o FEATS
# -f mfcc -f glove`); FOLD defaults to spk-Actor_01 (leave-one-speaker-out on the demo corpus).
# Models: probe (mfcc, 20 epochs), self_attn / cross_attn / cma (mfcc + glove, 4 epochs), one
# thread each, two at a time.  Prints one line per model: old UA, new UA, best epochs, max |diff|
# over WA, UA, macro-F1 and the test loss.
set -euo pipefail
old_rev=${1:?usage: $0 OLD_REV FEATS [FOLD]}
feats=$(cd "${2:?usage: $0 OLD_REV FEATS [FOLD]}" && pwd)
fold=${3:-spk-Actor_01}
repo=$(cd "$(dirname "$0")/.." && pwd)
py="${repo}/.venv/bin/python"
work=$(mktemp -d)
trap 'git -C "${repo}" worktree remove --force "${work}/old" >/dev/null 2>&1 || true; rm -rf "${work}"' EXIT
git -C "${repo}" worktree add -q --detach "${work}/old" "${old_rev}"

cd "${work}"  # not the repository: python -c would import sertool from the current folder
common=(--labels ravdess8 --protocol loso --fold "${fold}" --seeds 1 --threads 1 -q --overwrite)
train() {  # TREE TAG MODEL ARGS...
  local tree=$1 tag=$2 model=$3
  shift 3
  PYTHONPATH="${tree}" "${py}" -P -c "from sertool.cli import main; main()" train "${feats}" -m "${model}" \
    "${common[@]}" "$@" -o "${work}/${tag}-$(basename "${tree}")"
}
for tree in "${work}/old" "${repo}"; do
  train "${tree}" probe probe --audio mfcc --epochs 20 &
  train "${tree}" self self_attn --audio mfcc --text glove --set 'model.modalities=[audio,text]' --epochs 4 &
  wait
  train "${tree}" cross cross_attn --audio mfcc --text glove --set 'model.modalities=[audio,text]' --epochs 4 &
  train "${tree}" cma cma --audio mfcc --text glove --epochs 4 &
  wait
done
"${py}" - "${work}" "$(basename "${repo}")" <<'PY'
import json, sys

work, new = sys.argv[1], sys.argv[2]
for tag in ("probe", "self", "cross", "cma"):
    a = json.load(open(f"{work}/{tag}-old/metrics.json"))["runs"][0]
    b = json.load(open(f"{work}/{tag}-{new}/metrics.json"))["runs"][0]
    diff = max(abs(a["test"][k] - b["test"][k]) for k in ("WA", "UA", "macro_f1", "loss"))
    print(f"{tag:6s} old UA {a['test']['UA']:.6f}  new UA {b['test']['UA']:.6f}  "
          f"best epoch {a['best_epoch']}/{b['best_epoch']}  max |diff| {diff:.2e}")
PY
