"""Copy a trained experiment's predictor into a folder that `sertool predict` can use on its own.

    python recipes/ravdess/local/package_model.py EXP OUT_DIR [--name NAME] [--license-from CORPUS_README]

Copies predictor.json, model.safetensors, norm.safetensors, config.yaml and metrics.json, with
the absolute paths of the training machine replaced by paths relative to the repository, and
writes README.md (what the model is, its speaker-independent test scores from metrics.json,
how it was trained) and LICENSE (CC BY-NC-SA 4.0, inherited from RAVDESS).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]

LICENSE = """The model files in this folder (model.safetensors, norm.safetensors, predictor.json,
config.yaml, metrics.json) were trained on the RAVDESS speech recordings:

  Livingstone SR, Russo FA (2018) The Ryerson Audio-Visual Database of Emotional Speech and
  Song (RAVDESS). PLoS ONE 13(5): e0196391. https://doi.org/10.1371/journal.pone.0196391
  Zenodo record 1188976.

RAVDESS is licensed under Creative Commons Attribution-NonCommercial-ShareAlike 4.0
International (CC BY-NC-SA 4.0). As a derivative of it, this model is distributed under the
same license: CC BY-NC-SA 4.0, https://creativecommons.org/licenses/by-nc-sa/4.0/
Non-commercial use only; give attribution to the RAVDESS authors (and sertool); share
derivatives under the same license.

The sertool source code itself is under the license in the repository's LICENSE file; this
folder's license applies to the model files only.
"""


def relative(obj):
    """Absolute paths under the repository -> repository-relative; other absolute paths -> file name."""
    if isinstance(obj, dict):
        return {k: relative(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relative(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("/"):
        p = Path(obj)
        try:
            return p.resolve().relative_to(ROOT).as_posix()
        except ValueError:
            return obj if len(p.parts) < 3 else p.name
    return obj


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("exp", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--name", default="ravdess-mfcc")
    ap.add_argument("--command", default="recipes/ravdess/local/train_default_model.sh")
    args = ap.parse_args()
    exp, out = args.exp, args.out
    out.mkdir(parents=True, exist_ok=True)
    spec = relative(json.loads((exp / "predictor.json").read_text()))
    spec["name"] = args.name
    spec["license"] = "CC BY-NC-SA 4.0 (trained on RAVDESS; see LICENSE)"
    metrics = json.loads((exp / "metrics.json").read_text())
    spec["speaker_independent_test"] = {
        k: metrics["summary"][k] for k in ("WA", "UA", "macro_f1") if k in metrics["summary"]
    }
    (out / "predictor.json").write_text(json.dumps(spec, indent=2) + "\n")
    cfg = relative(yaml.safe_load((exp / "config.yaml").read_text()))
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out / "metrics.json").write_text(json.dumps(relative(metrics), indent=2) + "\n")
    for name in ("model.safetensors", "norm.safetensors"):
        shutil.copyfile(exp / name, out / name)
    (out / "LICENSE").write_text(LICENSE)
    s = metrics["summary"]
    feature = spec["features"]["audio"]
    folds = {f["name"]: f for f in json.loads((exp / "folds.json").read_text())["folds"]}
    sel = spec["selection"]
    if sel.get("final") == "all":
        deployed = (
            f"one model trained on all {sel['n_utterances']} recordings (no held-out data) for\n"
            f"  {sel['epochs']} epochs, the median of the {len(sel['selected_epoch_counts'])} cross-validation runs' selected\n"  # noqa: E501
            "  (best dev UA) epoch counts, normalised with statistics of all recordings; the scores below\n"
            "  are those of the cross-validation runs, which never saw their test actors"
        )
        norm_note = "mean and standard deviation of all recordings"
    else:
        chosen = folds[sel["fold"]]
        n_train, n_dev = len(chosen["train"]), len(chosen["dev"])
        deployed = (
            f"the fold x seed run with the best *dev* UA ({sel['fold']}: trained on\n"
            f"  {n_train} recordings of the other actors, with {n_dev} recordings of held-out training actors\n"
            "  for early stopping; its test actors are listed below); test scores were not used to choose it"
        )
        norm_note = "training\n  split's mean and standard deviation"
    runs = "\n".join(
        f"| {r['fold']} | {', '.join(folds[r['fold']]['info'].get('test_speakers', []))} | "
        f"{r['test']['WA']:.3f} | {r['test']['UA']:.3f} | {r['dev']['UA']:.3f} |"
        for r in metrics["runs"]
    )
    (out / "README.md").write_text(f"""# {args.name}: the default model of `sertool predict`

`sertool predict WAV_DIR` with no experiment folder uses this model.

* Task: 8 emotions of RAVDESS ({", ".join(spec["classes"])}), from the audio only.
* Model: `{spec["model_config"]["name"]}` (statistics pooling, mean + std over frames, of
  {feature["dim"]}-d `{feature["feature"]}` features, then one linear layer), cross-validated with
  `sertool train` on all 1,440 RAVDESS speech recordings (24 actors).
* Features: `{feature["extractor"]["name"]}` with the parameters in predictor.json (no model download:
  computed by sertool itself from the waveform, 16 kHz mono), normalised with the {norm_note}
  (norm.safetensors).
* Deployed weights: {deployed}.

## Speaker-independent accuracy (6-fold cross-validation by actors)

Protocol `speaker-kfold:6`: fold k tests actors 4k+1..4k+4, never seen in training; the dev
split (early stopping, model selection) is carved from the training actors. Mean ± std over
the 6 test folds:

| WA (accuracy) | UA (mean recall) | macro F1 |
|---|---|---|
| {s["WA"]["mean"]:.3f} ± {s["WA"]["std"]:.3f} | {s["UA"]["mean"]:.3f} ± {s["UA"]["std"]:.3f} | {s["macro_f1"]["mean"]:.3f} ± {s["macro_f1"]["std"]:.3f} |

Per fold:

| fold | test actors | test WA | test UA | dev UA |
|---|---|---|---|---|
{runs}

Chance is 0.125 (8 classes; neutral has half as many recordings as the others). This is a
small, fast baseline for getting started, not a state-of-the-art model: RAVDESS is acted
speech of two fixed sentences, and the scores will be lower on spontaneous speech, other
languages and other recording conditions.

## Reproduce

    bash {args.command} --ravdess /path/to/ravdess

## License

CC BY-NC-SA 4.0, like its training data (see LICENSE).
""")
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {len(list(out.iterdir()))} files, {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
