"""The recipes run end to end with tiny settings, each writing only into tmp_path.

* demo: the lead's recipe on a 32-clip subset of the embedded corpus (1 clip per actor x emotion);
* iemocap, mosei, meld: on small corpora generated in each corpus's layout by its `local/`.
Each test calls the real `run.sh` (which calls the real CLI) and checks the files every stage wrote.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def run_recipe(name: str, *args: str, timeout: int = 300) -> str:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # one torch/OpenMP thread in every command the recipe runs (as conftest's one_torch_thread in this
    # process): on a shared machine, idle threads spinning for a core cost more CPU and time than they save
    env.setdefault("OMP_NUM_THREADS", "1")
    r = subprocess.run(
        ["bash", str(RECIPES / name / "run.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    assert r.returncode == 0, f"{name}/run.sh failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout + r.stderr


def check_evaluated(exp: Path, n_runs: int, eval_name: str = "eval", metrics: tuple[str, ...] = ("WA", "UA")) -> dict:
    """EXP/<eval_name> as a recipe's evaluate stage must leave it: every fold x seed run evaluated,
    each metric finite with a finite std (WA, UA proportions), and the predictions CSV holding
    exactly the test utterances of each run's fold (EXP/folds.json)."""
    m = json.loads((exp / eval_name / "metrics.json").read_text())
    assert m["n_runs"] == len(m["runs"]) == n_runs, (exp.name, m["n_runs"], n_runs)
    for k in metrics:
        mean, std = m[k]["mean"], m[k]["std"]
        assert math.isfinite(mean) and math.isfinite(std) and std >= 0, (exp.name, k, m[k])
        if k in ("WA", "UA"):
            assert 0 <= mean <= 1, (exp.name, k, mean)
    folds = {f["name"]: f["test"] for f in json.loads((exp / "folds.json").read_text())["folds"]}
    with open(exp / eval_name / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_run: dict = {}
    for r in rows:
        by_run.setdefault((r["fold"], r["seed"]), []).append(r["id"])
    assert len(by_run) == n_runs and len(rows) == m["n_predictions"], (exp.name, sorted(by_run))
    for (fold, seed), ids in by_run.items():
        assert sorted(ids) == sorted(folds[fold]), (exp.name, fold, seed, len(ids), len(folds[fold]))
    return m


def test_predict_sample_skips_what_predict_cannot_use(tmp_path):
    """recipes/utils predict_sample (stage 6 of every corpus): no predictor.json, speaker-level
    normalisation and a clean refusal of `sertool predict` are skipped with a logged reason; the
    first usable experiment predicts; an unclean failure stops the recipe."""
    exp_root, bin_dir = tmp_path / "exp", tmp_path / "bin"
    for tag, spec in (
        ("unfinished", None),
        ("spk", {"normalize": {"audio": "speaker", "text": "none"}}),
        ("refused", {"normalize": {"audio": "global"}}),
        ("good", {"normalize": {"audio": "global"}}),
        ("crash", {}),
    ):
        (exp_root / tag).mkdir(parents=True)
        if spec is not None:
            (exp_root / tag / "predictor.json").write_text(json.dumps(spec))
    bin_dir.mkdir()
    (bin_dir / "sertool").write_text(
        "#!/usr/bin/env bash\n"  # stub: `sertool predict EXP SAMPLE ... -o OUT ...`
        'case "$2" in\n'
        '  */refused) echo "Error: this model cannot predict" >&2; exit 1 ;;\n'
        '  */crash) echo "Traceback (most recent call last):" >&2; exit 1 ;;\n'
        "esac\n"
        'while [ "$1" != -o ]; do shift; done; printf "file,label\\na.wav,happy\\n" > "$2"\n'
    )
    (bin_dir / "sertool").chmod(0o755)
    feats = tmp_path / "feats"
    feats.mkdir()
    (feats / "manifest.jsonl").write_text(json.dumps({"id": "a", "audio": "sample/a.wav", "text": "hi"}) + "\n")
    script = tmp_path / "r.sh"
    script.write_text(
        f'set -euo pipefail\n. "{RECIPES}/utils/common.sh"\n. "{RECIPES}/utils/experiments.sh"\n'
        f'exp_root={exp_root}\nfeats={feats}\ndevice=cpu\nmodels="$1"\n'
        f'predict_sample {feats}/sample\necho "status $?"\n'
    )
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(
        ["bash", str(script), "unfinished spk refused good crash"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0 and "status 0" in r.stdout and "a.wav,happy" in r.stdout, r.stdout + r.stderr
    assert "skip unfinished (no " in r.stderr and "skip spk (speaker-level normalisation" in r.stderr
    assert "skip refused (sertool predict refused: this model cannot predict)" in r.stderr
    assert (exp_root / "good" / "predictions-sample.csv").exists()
    assert not (exp_root / "crash" / "transcripts-sample.csv").exists()  # never reached: good came first
    r = subprocess.run(["bash", str(script), "refused crash good"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "status" not in r.stdout and "Traceback" in r.stderr, r.stdout + r.stderr


def test_common_helpers_parse_options_and_help(tmp_path):
    script = tmp_path / "r.sh"
    script.write_text(
        f'set -euo pipefail\n. "{RECIPES}/utils/common.sh"\nstage=0\nstop_stage=100\nnj=1\n'
        'RECIPE_OPTIONS="stage stop_stage nj"\nparse_options "$@"\n'
        'for s in 0 1 2 3; do stage_on $s && echo "on $s"; done; echo "nj=$nj"\n'
    )
    r = subprocess.run(
        ["bash", str(script), "--stage", "1", "--stop_stage", "2", "--nj", "3"], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.split("\n")[:3] == ["on 1", "on 2", "nj=3"], r.stdout + r.stderr
    r = subprocess.run(["bash", str(script), "--bogus", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
    for name in ("ravdess", "meld", "iemocap", "mosei"):
        r = subprocess.run(["bash", str(RECIPES / name / "run.sh"), "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--stop_stage" in r.stderr and "--corpus_dir" in r.stderr and "--nj" in r.stderr, (
            name
        )


@pytest.mark.slow
def test_demo_recipe_on_a_subset(tmp_path):
    corpus = tmp_path / "demo"
    rows = (RECIPES / "demo" / "data" / "metadata.csv").read_text().splitlines()
    keep, seen = [rows[0]], set()
    for line in rows[1:]:
        actor, emotion = line.split(",")[2], line.split(",")[4]
        if (actor, emotion) not in seen:
            seen.add((actor, emotion))
            keep.append(line)
            src = RECIPES / "demo" / "data" / line.split(",")[0]
            (corpus / line.split(",")[0]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, corpus / line.split(",")[0])
    (corpus / "metadata.csv").write_text("\n".join(keep) + "\n")
    assert len(keep) == 33
    out = run_recipe(
        "demo",
        "--corpus_dir",
        str(corpus),
        "--feats",
        str(tmp_path / "feats"),
        "--exp",
        str(tmp_path / "exp"),
        "--features",
        "mfcc",
        "--audio",
        "mfcc",
        "--epochs",
        "1",
        "--nj",
        "1",
        "--device",
        "cpu",
    )
    assert "| UA |" in out
    check_evaluated(tmp_path / "exp", 4)  # leave-one-speaker-out over 4 actors, 1 seed
    assert len((tmp_path / "exp" / "predictions-Actor_01.csv").read_text().splitlines()) == 1 + 8


@pytest.mark.slow
def test_iemocap_recipe_on_a_generated_corpus(tmp_path):
    feats, exp = tmp_path / "feats", tmp_path / "exp"
    out = run_recipe(
        "iemocap",
        "--fake",
        "true",
        "--fake_per_label",
        "1",
        "--fake_audio",
        "synthetic",
        "--corpus_dir",
        str(tmp_path / "IEMOCAP"),
        "--feats",
        str(feats),
        "--exp_root",
        str(exp),
        "--models",
        "cma self_attn cmd",
        "--ssl_feat",
        "mfcc",
        "--lm_feat",
        "bert",
        "--epochs",
        "1",
        "--folds4",
        "ses-Session1",
        "--folds7",
        "fold1",
        "--distill_opts",
        "--set distill.epochs=1 --set student.modalities=[text]",
        "--device",
        "cpu",
    )
    assert len((feats / "manifest.jsonl").read_text().splitlines()) == 80
    # CMD as the other models: `sertool distill`, then the train stage (`train -m cmd --init`) on --folds4
    for tag, protocol in (("cma", "loso-session"), ("self_attn", "rajan"), ("cmd", "loso-session")):
        check_evaluated(exp / tag, 1)
        assert f"| {tag} | {tag} |" in out
        assert json.loads((exp / tag / "folds.json").read_text())["protocol"]["name"].startswith(protocol)
    assert json.loads((exp / "cma" / "eval" / "metrics.json").read_text())["runs"][0]["fold"] == "ses-Session1"
    assert (exp / "cmd-distill" / "student.safetensors").exists()
    pred = (exp / "cma" / "predictions-sample.csv").read_text().splitlines()
    assert len(pred) == 1 + 16 and "p_happy" in pred[0]


@pytest.mark.slow
def test_mosei_recipe_on_generated_csd_files(tmp_path):
    feats, exp = tmp_path / "feats", tmp_path / "exp"
    out = run_recipe(
        "mosei",
        "--fake",
        "true",
        "--fake_videos",
        "12",
        "--corpus_dir",
        str(tmp_path / "mosei"),
        "--feats",
        str(feats),
        "--exp_root",
        str(exp),
        "--lengths",
        "30 50",
        "--epochs",
        "1",
        "--device",
        "cpu",
    )
    assert (feats / "aligned-csd_covarep-glove-50.h5").exists()
    for L in (30, 50):
        for T in (30, 50):
            m = check_evaluated(exp / f"lgcct-train{L}", 1, f"eval-crop{T}", ("MAE", "corr"))
            assert m["crop_length"] == T
    assert "CMU-MOSEI test, 30 words" in out and "| lgcct-train50 | lgcct |" in out
    assert "not possible" in out  # stages 4 and 6 say why they do nothing


@pytest.mark.slow
def test_meld_recipe_on_a_generated_text_corpus(tmp_path):
    feats, exp = tmp_path / "feats", tmp_path / "exp"
    out = run_recipe(
        "meld",
        "--fake",
        "true",
        "--fake_per_label",
        "3",
        "--corpus_dir",
        str(tmp_path / "meld"),
        "--feats",
        str(feats),
        "--exp_root",
        str(exp),
        "--models",
        "probe cmd",
        "--epochs",
        "1",
        "--distill_opts",
        "--set distill.epochs=1",
        "--device",
        "cpu",
    )
    check_evaluated(exp / "probe", 1)
    assert "| probe | probe | glove | corpus | 1 |" in out
    # CMD in two steps: `sertool distill` then `sertool train -m cmd --init`, evaluated like the others
    assert (exp / "cmd-distill" / "student.safetensors").exists()
    check_evaluated(exp / "cmd", 1)
    assert "| cmd | cmd |" in out
    assert "stage 2: skipped" in out and "stage 6: skipped" in out


@pytest.mark.slow
def test_ravdess_recipe_on_demo_clips(tmp_path):
    """The RAVDESS reader on 32 of the demo's RAVDESS-named clips (1 per actor x emotion): the probe,
    then the speaker-normalised probe and whisper_ft from stage 3."""
    corpus = tmp_path / "ravdess"
    seen = set()
    for path in sorted((RECIPES / "demo" / "data" / "audio").rglob("*.flac")):
        key = (path.parent.name, path.stem.split("-")[2])
        if key not in seen:
            seen.add(key)
            (corpus / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, corpus / path.parent.name / path.name)
    feats, exp = tmp_path / "feats", tmp_path / "exp"
    out = run_recipe(
        "ravdess",
        "--corpus_dir",
        str(corpus),
        "--feats",
        str(feats),
        "--exp_root",
        str(exp),
        "--models",
        "probe",
        "--protocol",
        "loso",
        "--folds",
        "spk-Actor_01",
        "--epochs",
        "1",
        "--device",
        "cpu",
    )
    assert len((feats / "manifest.jsonl").read_text().splitlines()) == 32
    assert "| probe | probe | mfcc | loso | 1 |" in out
    check_evaluated(exp / "probe", 1)
    assert len((exp / "probe" / "predictions-sample.csv").read_text().splitlines()) == 1 + 8
    # the speaker-normalised probe (on MFCC here, for speed): trained and evaluated, skipped by predict
    out = run_recipe(
        "ravdess",
        "--corpus_dir",
        str(corpus),
        "--feats",
        str(feats),
        "--exp_root",
        str(exp),
        "--models",
        "probe-whisper-spk probe whisper_ft",
        "--ssl_feat",
        "mfcc",
        "--stage",
        "3",
        "--protocol",
        "loso",
        "--folds",
        "spk-Actor_01",
        "--epochs",
        "1",
        "--device",
        "cpu",
    )
    assert "| probe-whisper-spk | probe | mfcc | loso | 1 |" in out
    cfg = yaml.safe_load((exp / "probe-whisper-spk" / "config.yaml").read_text())
    assert cfg["data"]["normalize"]["audio"] == "speaker"
    assert not (exp / "probe-whisper-spk" / "predictions-sample.csv").exists()
    # the fine-tuned Whisper (recipe conf: top two blocks, pooled statistics standardised) reads the waveform
    cfg = yaml.safe_load((exp / "whisper_ft" / "config.yaml").read_text())
    assert cfg["model"]["train_layers"] == 2 and cfg["model"]["pooled_norm"] == "batch"
    check_evaluated(exp / "whisper_ft", 1)
    assert "skip probe-whisper-spk (speaker-level normalisation" in out  # listed first: skipped, probe predicts
    assert len((exp / "probe" / "predictions-sample.csv").read_text().splitlines()) == 1 + 8
