"""Each default once: a model's defaults live in its YAML (sertool/conf/KEY.yaml, ``model:``), its
constructor takes exactly those keys, keyword-only and without defaults, and every shipped config
(sertool/conf, recipes/*/conf) resolves and builds; a misspelt key anywhere is an error naming it."""

from __future__ import annotations

import contextlib
import inspect
import re
import shlex
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from click.testing import CliRunner

from sertool import config, train
from sertool.cli import cli
from sertool.models import build_model, list_models, registry

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = registry.CONF_DIR
DISTILL_SECTIONS = {"student", "distill", "finetune"}  # a `sertool distill --config` file, not a model's
STORE_FLAGS = {"--audio": "audio", "--text": "text", "--visual": "visual"}


def model_class(key: str) -> type:
    list_models()
    return registry._REGISTRY[key]


def constructor_params(key: str) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(model_class(key).__init__).parameters)
    params.pop("self")
    return params


def signature_problems(key: str, model_section: dict) -> list[str]:
    """How a ``model:`` section and the constructor of ``key`` disagree (empty: they agree)."""
    params = constructor_params(key)
    keys = set(model_section) - set(registry.BUILD_KEYS)
    problems = [f"model.{k} is not a parameter of {model_class(key).__name__}" for k in sorted(keys - set(params))]
    problems += [f"parameter {p!r} has no value in the model section" for p in params if p not in keys]
    problems += [f"parameter {p!r} is not keyword-only" for p, v in params.items() if v.kind is not v.KEYWORD_ONLY]
    problems += [
        f"parameter {p!r} has a default ({v.default!r}): defaults live in conf/{key}.yaml only"
        for p, v in params.items()
        if v.default is not v.empty
    ]
    return problems


# ----------------------------------------------------------------------------- the configs shipped
def _train_exp_lines(run_sh: Path):
    """``(TAG, MODEL, args)`` of each ``train_exp TAG MODEL args...`` line of a recipe's run.sh."""
    text = run_sh.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("train_exp "):
            words = shlex.split(line, comments=True)
            if len(words) >= 3:
                yield words[1], words[2], words[3:]


def _overrides(args: list[str]) -> list[str]:
    """The recipe's literal ``--set`` values, and a placeholder store for each ``--audio/--text/--visual``
    (so that modalities follow the inputs as in the real run)."""
    out = []
    for flag, value in zip(args, args[1:]):
        if flag == "--set" and "$" not in value:
            out.append(value)
        elif flag in STORE_FLAGS:
            out.append(f"data.{STORE_FLAGS[flag]}=store")
    return out


def _model_from_name(stem: str) -> str | None:
    keys = [k for k in list_models() if stem == k or stem.startswith(k + "-")]
    return max(keys, key=len) if keys else None


def shipped_configs():
    """``(id, model, config file or None, overrides)``: every model's default YAML, every recipe
    ``train_exp`` experiment (with its conf/TAG.yaml when there is one) and every other recipe
    model config (its model from ``model.name`` or the file name)."""
    cases = [pytest.param(key, CONF_DIR / f"{key}.yaml", [], id=f"conf/{key}.yaml") for key in list_models()]
    for recipe in sorted(p for p in (ROOT / "recipes").iterdir() if (p / "conf").is_dir() or (p / "run.sh").exists()):
        used = set()
        if (recipe / "run.sh").exists():
            for tag, model, args in _train_exp_lines(recipe / "run.sh"):
                path = recipe / "conf" / f"{tag}.yaml"
                used.add(path)
                cases.append(
                    pytest.param(model, path if path.exists() else None, _overrides(args), id=f"{recipe.name}/{tag}")
                )
        for path in sorted((recipe / "conf").glob("*.yaml")):
            if path in used:
                continue
            doc = yaml.safe_load(path.read_text()) or {}
            if DISTILL_SECTIONS & set(doc):
                continue  # `sertool distill --config`: the distill stage's keys
            name = (doc.get("model") or {}).get("name") or _model_from_name(path.stem)
            cases.append(pytest.param(name, path, [], id=f"{recipe.name}/conf/{path.name}"))
    return cases


def resolve(model: str, path: Path | None, overrides: list[str]) -> dict:
    """The train stage's resolver.  A model whose config is completed from another experiment
    (``prepare_config``, e.g. cmd reads its student from ``model.init``) is resolved without that
    step: what is checked here is the keys."""
    if hasattr(model_class(model), "prepare_config"):
        ctx = mock.patch.object(train, "prepare_model_config", lambda cfg: None)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        return train.resolve_config(model, path, overrides)


@pytest.mark.parametrize("model, path, overrides", shipped_configs())
def test_every_shipped_config_resolves_and_builds(model, path, overrides):
    assert model in list_models(), f"{path}: no registered model for this config (model {model!r})"
    if path is not None:
        doc = config.load_config_file(path)
        assert not DISTILL_SECTIONS & set(doc), f"{path}: a distill config used for `sertool train -m {model}`"
    cfg = resolve(model, path, overrides)
    kwargs = {k: v for k, v in cfg["model"].items() if k not in registry.BUILD_KEYS}
    try:
        inspect.signature(model_class(model)).bind(**kwargs)
    except TypeError as e:
        pytest.fail(f"{path or model}: the resolved model section does not fit {model_class(model).__name__}: {e}")
    if hasattr(model_class(model), "prepare_config"):
        return  # built from another experiment (cmd: the distilled student); its keys are checked above
    with torch.device("meta"):
        net = build_model({"model": cfg["model"]})
    assert net.config["model"] == {**cfg["model"]}
    assert sum(p.numel() for p in net.parameters()) > 0


# ----------------------------------------------------------------------------- one place for defaults
@pytest.mark.parametrize("key", list_models())
def test_yaml_model_section_and_constructor_agree(key):
    section = registry.default_config(key)["model"]
    assert section["name"] == key
    assert signature_problems(key, section) == []


def test_every_model_conf_file_is_a_registered_model():
    assert sorted(p.stem for p in CONF_DIR.glob("*.yaml")) == sorted(list_models())


def test_a_misspelt_or_missing_key_in_a_model_yaml_is_reported(tmp_path, monkeypatch):
    text = (CONF_DIR / "lgcct.yaml").read_text()
    bad = yaml.safe_load(re.sub(r"^  gates:", "  gatse:", text, flags=re.M))["model"]
    assert signature_problems("lgcct", bad) == [
        "model.gatse is not a parameter of LGCCT",
        "parameter 'gates' has no value in the model section",
    ]
    # and a default written into a constructor again is reported too
    cls = model_class("probe")
    monkeypatch.setattr(
        cls, "__init__", lambda self, *, modality, input_dim, layers, n_classes, task, dropout, hidden=0: None
    )
    assert signature_problems("probe", registry.default_config("probe")["model"]) == [
        "parameter 'hidden' has a default (0): defaults live in conf/probe.yaml only"
    ]


# ----------------------------------------------------------------------------- misspelt keys
def test_a_misspelt_key_in_a_config_file_names_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  gatse: false\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: unknown config key 'model.gatse'$"):
        train.resolve_config("lgcct", path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: unknown config key 'model.gatse'$"):
        registry.load_config("lgcct", path=path)
    path.write_text("model:\n  wav2vec2_config:\n    hiden_size: 12\n")
    with pytest.raises(ValueError, match=r"unknown config key 'model.wav2vec2_config.hiden_size'$"):
        registry.load_config("cma", path=path)


def test_merge_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model: {name: lgcct, d: 60}\nsertool_version: '1.0'\n")
    cfg = config.merge_file(registry.default_config("lgcct"), path, ignore=["sertool_version"])
    assert cfg["model"]["d"] == 60
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: unknown config key 'sertool_version'$"):
        config.merge_file(registry.default_config("lgcct"), path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: model.name is 'lgcct' but the model is 'probe'$"):
        config.merge_file(registry.default_config("probe"), path, ignore=["sertool_version"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.gatse=false", "unknown config key 'model.gatse' (in override 'model.gatse=false')"),
        ("optim.lr.x=1", "unknown config key 'optim.lr.x' (in override 'optim.lr.x=1')"),
        ("modle.d=3", "unknown config key 'modle' (in override 'modle.d=3')"),
        ("model.d=abc", "config key 'model.d': expected a number, got 'abc'"),
        ("model.gates", "override 'model.gates' is not of the form key.sub=value"),
        ("=1", "override '=1' is not of the form key.sub=value"),
    ],
)
def test_a_misspelt_set_names_the_key(override, message):
    with pytest.raises(ValueError) as e:
        train.resolve_config("lgcct", None, [override])
    assert str(e.value) == message
    with pytest.raises(ValueError) as e:
        build_model("lgcct", [override])
    assert str(e.value) == message


def test_cli_train_names_a_misspelt_key_in_one_line(tmp_path):
    feats = tmp_path / "feats"
    feats.mkdir()
    conf = tmp_path / "c.yaml"
    conf.write_text("train:\n  epoch: 3\n")
    for args, message in (
        (["--set", "model.gatse=false"], "Error: unknown config key 'model.gatse'"),
        (["--config", str(conf)], f"Error: {conf}: unknown config key 'train.epoch'"),
    ):
        r = CliRunner().invoke(cli, ["train", str(feats), "-m", "lgcct", *args, "-o", str(tmp_path / "e")])
        assert r.exit_code == 1 and r.output.startswith(message), r.output
        assert len(r.output.strip().splitlines()) == 1, r.output


# ----------------------------------------------------------------------------- sertool.config
def test_registry_keeps_the_old_names():
    assert registry._merge is config.merge and registry._coerce is config.coerce
    assert registry.apply_overrides is config.apply_overrides
    assert registry._split_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


def test_one_key_value_parser():
    assert config.parse_assignment(" k =1e-3", "w", "bad") == ("k", "1e-3")
    assert config.parse_assignment("k=", "w", "bad") == ("k", None)
    assert config.parse_assignment("k=a=b", "w", "bad") == ("k", "a=b")
    assert config.parse_assignment("k=[a, b]", "w", "bad") == ("k", ["a", "b"])
    for item in ("k", "=1", " =1"):
        with pytest.raises(ValueError, match="^bad$"):
            config.parse_assignment(item, "w", "bad")
    with pytest.raises(ValueError, match=r"^w: '\{' is not a valid value \(line 1, column 2: "):
        config.parse_assignment("k={", "w", "bad")
    cfg = {"optim": {"lr": 1.0, "steps": 3, "on": True, "mods": ["audio"]}}
    config.apply_overrides(cfg, ["optim.lr=1e-3", "optim.steps=4.0", "optim.on=false", "optim.mods=text"])
    assert cfg == {"optim": {"lr": 1e-3, "steps": 4, "on": False, "mods": ["text"]}}
    with pytest.raises(ValueError, match=r"config key 'optim.on': expected true/false, got 'yes please'"):
        config.apply_overrides(cfg, ["optim.on=yes please"])


def test_load_yaml_errors_are_one_line_naming_the_file(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'a: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ValueError) as e:
        config.load_yaml(evil)
    assert str(e.value) == (
        f"{evil}: line 1, column 4: the tag '!!python/object/apply:os.system' is not allowed "
        "(sertool reads plain YAML only, never Python objects)"
    )
    assert not marker.exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(broken))}: line 2, column 2: expected ',' or ']'") as e:
        config.load_yaml(broken)
    assert "\n" not in str(e.value)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("a: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(latin))}: not UTF-8 text"):
        config.load_yaml(latin)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="a config file must be a YAML mapping"):
        config.load_config_file(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert config.load_config_file(tmp_path / "empty.yaml") == {}


def test_default_configs_are_read_with_the_safe_loader(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "probe.yaml").write_text("model: !!python/name:os.system\n")
    monkeypatch.setattr(registry, "CONF_DIR", conf)
    monkeypatch.setattr(registry, "_DEFAULTS_READ", {})
    with pytest.raises(ValueError, match=r"probe.yaml: line 1, column 8: the tag '!!python/name:os.system'"):
        registry.default_config("probe")
