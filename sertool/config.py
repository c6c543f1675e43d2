"""Config machinery shared by every stage: YAML files, ``KEY=VALUE`` options, strict merging.

* :func:`load_yaml` / :func:`load_config_file` read a YAML file with ``yaml.safe_load``; a syntax
  error or a tag that would build a Python object (``!!python/object...``) is a ``ValueError``
  naming the file and the problem in one line (nothing in the file is ever executed).
* :func:`parse_assignment` is the one ``KEY=VALUE`` parser (``--set``, ``--corpus-opt``, feature
  options): the value is read with ``yaml.safe_load`` (``20`` -> int, ``false`` -> bool,
  ``[a, b]`` -> list, ``1e-3`` -> float after coercion, empty -> ``None``).
* :func:`merge`, :func:`merge_file` and :func:`apply_overrides` are strict: a key that is not in the base config is
  an error naming the full dotted key; values are coerced to the base value's type
  (:func:`coerce`) where that is unambiguous.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import yaml

__all__ = [
    "load_yaml",
    "load_config_file",
    "yaml_problem",
    "parse_value",
    "parse_assignment",
    "coerce",
    "merge",
    "merge_file",
    "apply_overrides",
]

_PYTHON_TAG = "could not determine a constructor for the tag"


# ----------------------------------------------------------------------------- YAML files
def yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a PyYAML error: ``[FILE: ]line L, column C: problem`` (the file when PyYAML
    knows it, i.e. when it read an open file)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if problem.startswith(_PYTHON_TAG):
        tag = problem[len(_PYTHON_TAG) :].strip().strip("'").replace("tag:yaml.org,2002:", "!!")
        problem = f"the tag {tag!r} is not allowed (sertool reads plain YAML only, never Python objects)"
    elif getattr(e, "context", None):
        problem = f"{problem} ({e.context})"
    if mark is None:
        return " ".join(problem.split())
    where = "" if mark.name.startswith("<") else f"{mark.name}: "
    return f"{where}line {mark.line + 1}, column {mark.column + 1}: {' '.join(problem.split())}"


def load_yaml(path: str | os.PathLike) -> Any:
    """``yaml.safe_load`` of the file ``path``; a YAML syntax error, a Python tag or a file that is
    not UTF-8 text raises ``ValueError("PATH: line L, column C: problem")``.  A missing file is the
    usual ``FileNotFoundError``."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        problem = yaml_problem(e)
        prefix = f"{path}: "
        raise ValueError(problem if problem.startswith(prefix) else prefix + problem) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_config_file(path: str | os.PathLike) -> dict:
    """A user config file: a YAML mapping (an empty file is ``{}``)."""
    cfg = load_yaml(path)
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a config file must be a YAML mapping")
    return cfg


# ----------------------------------------------------------------------------- KEY=VALUE
def parse_value(raw: str, where: str) -> Any:
    """``raw`` read as YAML (empty -> None); a bad value raises ``ValueError`` starting with ``where``."""
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: {raw!r} is not a valid value ({yaml_problem(e)})") from None


def parse_assignment(item: str, where: str, malformed: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(KEY, VALUE read as YAML)``.

    ``malformed``: the error message when ``item`` has no ``=`` or an empty key; ``where``: how the
    error for a value that is not valid YAML names the item (``--set 'a.b={'``).
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(malformed)
    return key, parse_value(raw, where)


# ----------------------------------------------------------------------------- merging
def coerce(default: Any, value: Any, key: str) -> Any:
    """Make YAML scalars match the default's type where that is unambiguous."""
    number = isinstance(default, (int, float)) and not isinstance(default, bool)
    if isinstance(value, str) and number:
        try:  # PyYAML reads "1e-3" as a string
            value = float(value)
        except ValueError:
            raise ValueError(f"config key '{key}': expected a number, got {value!r}") from None
    if number and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"config key '{key}': expected a number, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, list) and isinstance(value, str):
        value = [value]  # model.modalities=audio
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ValueError(f"config key '{key}': expected true/false, got {value!r}")
    if number and isinstance(default, int) and isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


def merge(base: dict, update: dict, prefix: str = "") -> None:
    """Merge ``update`` into ``base`` in place; a key not in ``base`` is an error naming the dotted key."""
    for k, v in update.items():
        name = f"{prefix}{k}"
        if k not in base:
            raise ValueError(f"unknown config key '{name}'")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ValueError(f"config key '{name}' is a section; got {v!r}")
            merge(base[k], v, name + ".")
        else:
            base[k] = coerce(base[k], v, name)


def merge_file(cfg: dict, path: str | os.PathLike, ignore: Iterable[str] = ()) -> dict:
    """Merge the config file ``path`` onto ``cfg`` in place (strict keys, errors name the file) and
    return ``cfg``; top-level keys in ``ignore`` (records an experiment's config.yaml carries) are
    skipped.  A ``model.name`` in the file must be the model of ``cfg``."""
    user = {k: v for k, v in load_config_file(path).items() if k not in set(ignore)}
    name = user["model"].get("name") if isinstance(user.get("model"), dict) else None
    if name is not None and name != cfg.get("model", {}).get("name"):
        raise ValueError(f"{path}: model.name is {name!r} but the model is {cfg['model']['name']!r}")
    try:
        merge(cfg, user)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg


def split_override(ov: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> ``(["a", "b"], value)``."""
    key, value = parse_assignment(ov, f"override {ov!r}", f"override {ov!r} is not of the form key.sub=value")
    return key.split("."), value


def apply_overrides(cfg: dict, overrides: Iterable[str] = ()) -> dict:
    """Apply ``a.b=value`` overrides in place (unknown keys -> ValueError naming the key)."""
    for ov in overrides or ():
        path, value = split_override(ov)
        node = cfg
        for i, p in enumerate(path[:-1]):
            if p not in node or not isinstance(node[p], dict):  # the first key that is not there
                unknown = path[: i + 1] if p not in node else path[: i + 2]
                raise ValueError(f"unknown config key '{'.'.join(unknown)}' (in override {ov!r})")
            node = node[p]
        last = path[-1]
        name = ".".join(path)
        if last not in node:
            raise ValueError(f"unknown config key '{name}' (in override {ov!r})")
        if isinstance(node[last], dict) and not isinstance(value, dict):
            raise ValueError(f"config key '{name}' is a section; got {value!r}")
        if isinstance(node[last], dict):
            merge(node[last], value, name + ".")
        else:
            node[last] = coerce(node[last], value, name)
    return cfg
