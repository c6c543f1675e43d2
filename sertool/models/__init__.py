"""sertool models: one file per published system, built from YAML configs.

>>> from sertool.models import build_model, list_models, load_config, describe_models
>>> model = build_model("lgcct", ["model.gates=false"])
>>> logits = model({"audio": a, "audio_mask": am, "text": t, "text_mask": tm})

See ``docs/models.md`` for the table of models, parameter counts and departures from the papers.
"""

from .registry import (
    SERModel,
    apply_overrides,
    build_model,
    count_parameters,
    default_config,
    describe_models,
    list_models,
    load_config,
    register,
)

__all__ = [
    "build_model",
    "list_models",
    "load_config",
    "describe_models",
    "default_config",
    "apply_overrides",
    "count_parameters",
    "register",
    "SERModel",
]
