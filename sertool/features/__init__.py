"""Feature extractors, registered by name; `build_extractor` rebuilds one from its config.

Every extractor records `config()`, a JSON dict that `build_extractor(config)` turns back into
the same extractor: the store keeps it in its `extractor` attribute, so `predict` can compute
exactly the features a model was trained on.
"""

from sertool.features.base import (  # noqa: F401
    Extractor,
    ExtractorError,
    FeatureResult,
    build_extractor,
    list_extractors,
    register_extractor,
    register_preset,
)
