"""The recipes run end to end with tiny settings, each writing only into tmp_path.

* demo: the lead's recipe on a 32-clip subset of the embedded corpus (1 clip per actor x emotion);
* iemocap, mosei, meld: on small corpora generated in each corpus's layout by its `local/`.
Each test calls the real `run.sh` (which calls the real CLI) and checks the files every stage wrote.
"""

from __future__ import annotations

import json
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
    r = subprocess.run(["bash", str(RECIPES / name / "run.sh"), *args], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, f"{name}/run.sh failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout + r.stderr


def test_common_helpers_parse_options_and_help(tmp_path):
    script = tmp_path / "r.sh"
    script.write_text(f'set -euo pipefail\n. "{RECIPES}/utils/common.sh"\nstage=0\nstop_stage=100\nnj=1\n'
                      'RECIPE_OPTIONS="stage stop_stage nj"\nparse_options "$@"\n'
                      'for s in 0 1 2 3; do stage_on $s && echo "on $s"; done; echo "nj=$nj"\n')
    r = subprocess.run(["bash", str(script), "--stage", "1", "--stop_stage", "2", "--nj", "3"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split("\n")[:3] == ["on 1", "on 2", "nj=3"], r.stdout + r.stderr
    r = subprocess.run(["bash", str(script), "--bogus", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
    for name in ("ravdess", "meld", "iemocap", "mosei"):
        r = subprocess.run(["bash", str(RECIPES / name / "run.sh"), "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--stop_stage" in r.stderr and "--corpus_dir" in r.stderr and "--nj" in r.stderr, name


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
    out = run_recipe("demo", "--corpus_dir", str(corpus), "--feats", str(tmp_path / "feats"), "--exp", str(tmp_path / "exp"),
                     "--features", "mfcc", "--audio", "mfcc", "--epochs", "1", "--nj", "1", "--device", "cpu")
    assert "| UA |" in out
    assert (tmp_path / "exp" / "eval" / "metrics.json").exists()
    assert len((tmp_path / "exp" / "predictions-Actor_01.csv").read_text().splitlines()) == 1 + 8


@pytest.mark.slow
def test_iemocap_recipe_on_a_generated_corpus(tmp_path):
    feats, exp = tmp_path / "feats", tmp_path / "exp"
    out = run_recipe("iemocap", "--fake", "true", "--fake_per_label", "1", "--fake_audio", "synthetic", "--corpus_dir", str(tmp_path / "IEMOCAP"),
                     "--feats", str(feats), "--exp_root", str(exp), "--models", "cma self_attn cmd",
                     "--ssl_feat", "mfcc", "--lm_feat", "bert", "--epochs", "1", "--folds4", "ses-Session1", "--folds7", "fold1",
                     "--distill_opts", "--set distill.epochs=1 --set finetune.epochs=1 --set student.modalities=[text]",
                     "--device", "cpu")
    assert len((feats / "manifest.jsonl").read_text().splitlines()) == 80
    for tag, protocol in (("cma", "loso-session"), ("self_attn", "rajan")):
        m = json.loads((exp / tag / "eval" / "metrics.json").read_text())
        assert m["UA"]["mean"] >= 0 and f"| {tag} |" in out
        assert json.loads((exp / tag / "folds.json").read_text())["protocol"]["name"].startswith(protocol)
    assert json.loads((exp / "cma" / "folds.json").read_text())["folds"][0]["name"] == "ses-Session1"
    assert (exp / "cmd" / "finetune" / "metrics.json").exists() and "CMD" in out
    pred = (exp / "cma" / "predictions-sample.csv").read_text().splitlines()
    assert len(pred) == 1 + 16 and "p_happy" in pred[0]


@pytest.mark.slow
def test_mosei_recipe_on_generated_csd_files(tmp_path):
    feats, exp = tmp_path / "feats", tmp_path / "exp"
    out = run_recipe("mosei", "--fake", "true", "--fake_videos", "12", "--corpus_dir", str(tmp_path / "mosei"),
                     "--feats", str(feats), "--exp_root", str(exp), "--lengths", "30 50", "--epochs", "1", "--device", "cpu")
    assert (feats / "aligned-csd_covarep-glove-50.h5").exists()
    for L in (30, 50):
        for T in (30, 50):
            m = json.loads((exp / f"lgcct-train{L}" / f"eval-crop{T}" / "metrics.json").read_text())
            assert "MAE" in m and m["crop_length"] == T
    assert "CMU-MOSEI test, 30 words" in out and "| lgcct-train50 | lgcct |" in out
    assert "not possible" in out  # stages 4 and 6 say why they do nothing


@pytest.mark.slow
def test_meld_recipe_on_a_generated_text_corpus(tmp_path):
    feats, exp = tmp_path / "feats", tmp_path / "exp"
    out = run_recipe("meld", "--fake", "true", "--fake_per_label", "3", "--corpus_dir", str(tmp_path / "meld"),
                     "--feats", str(feats), "--exp_root", str(exp), "--models", "probe cmd", "--epochs", "1",
                     "--distill_opts", "--set distill.epochs=1", "--device", "cpu")
    assert json.loads((exp / "probe" / "eval" / "metrics.json").read_text())["UA"]["mean"] >= 0
    # CMD in two steps: `sertool distill` then `sertool train -m cmd --init`, evaluated like the others
    assert (exp / "cmd-distill" / "student.safetensors").exists()
    assert json.loads((exp / "cmd" / "eval" / "metrics.json").read_text())["n_runs"] == 1
    assert "| cmd | cmd |" in out
    assert "stage 2: skipped" in out and "stage 6: skipped" in out


@pytest.mark.slow
def test_ravdess_recipe_on_demo_clips(tmp_path):
    """The RAVDESS reader on 32 of the demo's RAVDESS-named clips (1 per actor x emotion), probe only."""
    corpus = tmp_path / "ravdess"
    seen = set()
    for path in sorted((RECIPES / "demo" / "data" / "audio").rglob("*.flac")):
        key = (path.parent.name, path.stem.split("-")[2])
        if key not in seen:
            seen.add(key)
            (corpus / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, corpus / path.parent.name / path.name)
    feats, exp = tmp_path / "feats", tmp_path / "exp"
    out = run_recipe("ravdess", "--corpus_dir", str(corpus), "--feats", str(feats), "--exp_root", str(exp),
                     "--models", "probe", "--protocol", "loso", "--folds", "spk-Actor_01", "--epochs", "1", "--device", "cpu")
    assert len((feats / "manifest.jsonl").read_text().splitlines()) == 32
    assert "| probe | probe | mfcc | loso | 1 |" in out
    assert len((exp / "probe" / "predictions-sample.csv").read_text().splitlines()) == 1 + 8
    # the speaker-normalised probe (on MFCC here, for speed): trained and evaluated, skipped by predict
    out = run_recipe("ravdess", "--corpus_dir", str(corpus), "--feats", str(feats), "--exp_root", str(exp),
                     "--models", "probe probe-whisper-spk", "--ssl_feat", "mfcc", "--stage", "3", "--protocol", "loso",
                     "--folds", "spk-Actor_01", "--epochs", "1", "--device", "cpu")
    assert "| probe-whisper-spk | probe | mfcc | loso | 1 |" in out
    cfg = yaml.safe_load((exp / "probe-whisper-spk" / "config.yaml").read_text())
    assert cfg["data"]["normalize"]["audio"] == "speaker"
    assert not (exp / "probe-whisper-spk" / "predictions-sample.csv").exists()
