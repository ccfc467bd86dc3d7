"""tarab's networks, data pipeline, training, evaluation and model bundles.

``models`` never imports ``realtime``; feature extraction is passed in by the caller.
"""

from .bundle import Bundle, Card, load_bundle, save_bundle
from .errors import BundleError, DataError, ParameterError, TarabError

__all__ = ["Bundle", "BundleError", "Card", "DataError", "ParameterError", "TarabError", "load_bundle", "save_bundle"]
